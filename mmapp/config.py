"""The one configuration surface: every knob of every component, typed and frozen, one section each.

``load_config`` reads ``configs/<profile>.yaml`` and applies environment overrides
``MMAPP__SECTION__FIELD=value`` (e.g. ``MMAPP__TRAIN__EPOCHS=5``, ``MMAPP__FINETUNE__EPOCHS=8``);
the most common ones have short names too (``MMAPP_PROFILE``, ``MMAPP_HOME``,
``MMAPP_DATABASE_URL``, ``MMAPP_OPERATOR_USER``, ``MMAPP_OPERATOR_PASSWORD``).
``python -m mmapp config`` prints the effective configuration with secrets redacted
(:func:`redacted`). Where things live on disk is :class:`mmapp.paths.Paths` (``config.paths``).
No I/O happens at import.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from mmapp.paths import Paths

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
PROFILES = ("offline", "clip", "blip")
ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # data the app ships (not tests/)
SECRET_FIELDS = (("app", "operator_password"),)  # printed as "***"; database passwords are masked too


@dataclass(frozen=True)
class ModelConfig:
    image_encoder: str = "efficientnet-lite0"  # see `python -m mmapp list-encoders`
    text_encoder: str = "minilm"
    ocr: str = "rapidocr"
    ocr_det_side: int = 512  # longest side the OCR detector sees; smaller is faster
    clip_model: str = "ViT-B-32"  # open_clip architecture, used by the clip-* encoders
    clip_pretrained: str = ""  # hub tag, "local-dir:PATH" or a checkpoint file; "" = random init
    joint_dim: int = 256  # common embedding dimension of the projections
    bridge_top_t: int = 10  # ConSE: ImageNet classes averaged per image
    fusion_head: str = "concat"  # late | concat | cross-attention
    caption_confidence_floor: float = 0.1  # below this calibrated confidence a caption is flagged as a guess
    meme_labels: tuple[str, ...] = ("positive", "sarcastic", "dark humor")
    meme_text_features: str = "vader-v1"  # what a new meme head reads as text: "" (embedding only) | "vader-v1"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    captioner: str = ""  # "" = captions retrieved from the bank only; "hf" = a transformers captioner (mmapp/captioner.py)
    captioner_path: str = ""  # local folder with the captioner's save_pretrained files (model + processor), or hub:<repo id> (online / HF cache)
    captioner_max_new_tokens: int = 30  # generated caption length budget
    captioner_num_beams: int = 1  # 1 = greedy decoding; >1 = beam search
    batch_images: str = "auto"  # concurrent requests' image-tower calls as one batch (mmapp.batching): auto (on with CUDA towers) | on | off
    batch_max_size: int = 16  # at most this many pictures per batched image-tower call
    batch_max_wait_ms: float = 5.0  # the first request of a batch waits at most this long for others to join
    image_runtime: str = "auto"  # frozen image tower at inference: auto (onnxruntime for a float32 CPU tower, else torch) | torch | onnx
    image_runtime_threads: int = 0  # onnxruntime intra-op threads for bulk batches; 0 = torch's thread count
    image_runtime_serving_threads: int = 1  # ... for a request's few pictures (parallel requests fill the cores); 0 = as bulk
    decode_on_device: str = "auto"  # bulk embedding (build, import, retrain) decodes JPEGs on the tower's device: auto (on with CUDA) | on | off


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature_init: float = 0.07  # InfoNCE temperature at start; learnable
    modality_dropout: float = 0.3  # per-modality drop probability when training fusion heads
    unfreeze_last_n: int = 0  # image-tower blocks mmapp.finetune trains (0 = frozen; GPU advised; not the retrain job)
    label_smoothing: float = 0.0
    meme_epochs: int = 40  # fusion-head epochs of a model trained from scratch (bootstrap)


@dataclass(frozen=True)
class StorageConfig:
    home: Path = REPO_ROOT / "var"  # everything the app writes lives under here
    database_url: str = ""  # "" = SQLite at <home>/mmapp.db; any SQLAlchemy URL otherwise

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{Paths(self.home).database}"


@dataclass(frozen=True)
class DataConfig:
    # Hand-captioned real photos (image<TAB>caption) that every choice of score mix must not make
    # worse than the zero-training bridge. Shipped with the app; a missing file is an error.
    guard_photos: Path = ASSETS_DIR / "photos" / "captions.tsv"
    # Hand-captioned real photos no choice ever sees (caption wording, score mix, gates): reported only.
    report_photos: Path = ASSETS_DIR / "photos_report" / "captions.tsv"


@dataclass(frozen=True)
class AppConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: int = 20
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 2000
    operator_user: str = ""
    operator_password: str = ""
    concurrency_limit: int = 2  # model events run at most this many at once
    batched_concurrency_limit: int = 8  # ... and this many with model.batch_images on, so concurrent requests can share a batch
    torch_threads: int = 0  # intra-op threads per model call in the web process; 0 = torch's default (one per core); see docs/results.md issue 13
    # -- abuse limits (docs/security.md); per client = per keyed hash of its address, in memory only --
    queue_max_size: int = 128  # events waiting in Gradio's queue beyond this are refused ("queue is full")
    uploads_per_minute: float = 30.0  # per client, token bucket refill rate for POST /gradio_api/upload
    upload_burst: int = 60  # per client, uploads allowed at once before the rate applies
    uploads_per_day: int = 2000  # per client, rolling 24 h quota of uploads
    events_per_minute: float = 600.0  # per client, API calls (queue joins, /run, /call)
    event_burst: int = 120
    trusted_proxies: tuple[str, ...] = ()  # X-Forwarded-For is believed only from these addresses
    root_path: str = ""  # behind a proxy under a path prefix (e.g. "/mmapp"): Gradio's root_path; "" = served at /
    min_free_disk_mb: int = 1024  # below this free space (home or upload temp) uploads are refused; ratings go on
    export_ttl_s: float = 3600.0  # export zips and report links expire (deleted) this long after creation
    unrated_upload_retention_days: float = 30.0  # image files of uploads nobody rated or corrected are deleted after


@dataclass(frozen=True)
class RetrainConfig:
    cron: str = "0 3 * * *"  # nightly, server local time (scheduler.timezone to pin it)
    replay_size: int = 2000  # bootstrap pairs mixed into each fine-tune
    label_quorum: int = 2  # raters that must agree on a label correction when several rated it
    max_user_share: float = 0.3  # poisoning guard: at most this share of accepted items per user
    outlier_z: float = -2.5  # robust z-score of image-text similarity below which a pair is held back
    near_duplicate_cos: float = 0.98  # image AND text cosine at or above this = near duplicate
    min_agreement: float = 1.0  # a caption must beat random captions of its image by this many SDs
    tolerance: float = 0.01  # allowed regression of any gated metric
    min_new_items: int = 1
    min_rating: float = 4.0  # mean coherence/relevance at which a rated caption counts as a good pair
    n_bootstrap: int = 1000  # resamples for the metrics' 95% intervals
    agreement_bank: int = 256  # reference captions each pair's image-text agreement is standardised against
    clean_epochs: int = 4  # epochs of each cross-fitting model that scores agreement (0 = the current model scores)
    clean_lr_scale: float = 0.3  # its learning rate = train.lr * this (separates honest from random best in the sim)
    lock_ttl_s: float = 300.0  # run lease length; a killed worker's lease frees after this
    heartbeat_s: float = 15.0  # how often a live run renews its lease and stamps its row
    stale_after_s: float = 300.0  # a 'running' row without a heartbeat this long is marked failed
    runner: str = "worker"  # worker: `python -m retrain worker` (python app.py starts it) trains; in-process: a web thread
    worker_poll_s: float = 2.0  # how often the worker looks for an operator's "retrain now"
    # The worker lowers its own CPU priority by this much (os.nice) so a run on shared cores takes what the web
    # process leaves idle instead of slowing its requests; 0 keeps the priority (docs/results.md, issue 13).
    worker_nice: int = 10
    # Replicas (docs/deploy.md): every replica may run its own worker (one scheduler fires by lease, one worker
    # takes each request by an atomic claim, a surviving worker takes over); false runs none in this app process.
    worker_in_app: bool = True  # python app.py starts and supervises a worker child; false: run `python -m retrain worker` yourself
    # Trust (docs/security.md "Accounts and sessions"): operators and trusted annotators vs. everyone else.
    trusted_label_votes: int = 2  # votes a trusted rater's label counts for in the label quorum (2 = a quorum alone)
    anonymous_rule: str = "trusted_agreement"  # how untrusted feedback is confirmed: "trusted_agreement" | "quorum" | "open" (off)
    anonymous_quorum: int = 3  # "quorum": distinct sessions that must give the same label / a close caption per image
    anonymous_agree_cos: float = 0.8  # two captions of one image "agree" at this text cosine or above
    max_anonymous_per_run: int = 50  # "quorum": at most this many pictures' anonymous items accepted per run (per night)
    anonymous_cap_holds: int = 1  # runs an item held back by that cap is reconsidered in, earliest first; then rejected
    trusted_chance_check: bool = False  # False: trusted raters' pairs skip the outlier / chance-agreement tests
    clean_folds: int = 2  # folds of the cross-fitted agreement scoring (each scorer learns from the other folds)
    # The chance test per rater (retrain/cleaning.py flag_chance_agreement, docs/flywheel.md): a rater with at least
    # rater_min_items tested pairs in a run is judged on all of them (0 = off): no better than random captions at
    # rater_chance_alpha -> all rejected; at most rater_rescue_max_fail_share under the bar -> those at or above
    # rater_rescue_floor are kept.
    rater_min_items: int = 10
    rater_chance_alpha: float = 0.05
    rater_rescue_max_fail_share: float = 0.4
    rater_rescue_floor: float = 0.0
    # Blind before/after comparison (docs/flywheel.md "Blind comparison"): raters pick current vs candidate.
    blind_pairs: int = 30  # held-out items per run shown side by side in the Compare tab (0 = off)
    blind_required: bool = False  # True: a candidate that passes the metric gate is held until raters decide
    blind_min_votes: int = 30  # votes a held candidate needs before it is decided
    blind_min_win_rate: float = 0.4  # promote when the Wilson 95% lower bound of its win rate (same = 1/2) reaches this
    blind_anonymous_votes: bool = False  # let sessions that are not logged in vote (off: accounts only)
    # Generative captioner fine-tuning (retrain.captioner_stage; only with model.captioner set): text decoder only.
    captioner_epochs: int = 15  # decoder epochs over users' pairs (each batch about half replay)
    captioner_lr: float = 1e-3  # AdamW peak learning rate (one-cycle)
    captioner_batch_size: int = 32
    captioner_train_vision: bool = False  # also tune the vision encoder (then in the version's delta too)
    captioner_replay_size: int = 512  # replayed pairs sampled from captioner_replay_pairs
    captioner_replay_pairs: str = ""  # pairs file the captioner learned from (replay); "" = the bootstrap train split
    captioner_guard_pairs: str = ""  # old-concept pairs that must not regress; "" = the bootstrap val split
    captioner_guard_size: int = 200  # at most this many guard pairs are captioned per run
    captioner_min_agreement: float = 1.0  # a caption's likelihood must beat other captions of its image by this many SDs
    captioner_agreement_bank: int = 32  # other captions each caption's likelihood is standardised against
    captioner_clean_epochs: int = 8  # epochs of each cross-fitted decoder that scores agreement (0 = the current one)
    captioner_cider_tolerance: float = 0.25  # allowed CIDEr-D drop (scale 0-10) on the gate's sets
    captioner_bleu_tolerance: float = 0.02  # allowed BLEU-4 drop on the gate's sets
    captioner_min_heldout: int = 3  # accepted held-out pairs the gate needs to judge a candidate


@dataclass(frozen=True)
class AuthConfig:
    """Rater accounts and login sessions (feedback_db.accounts; docs/security.md "Accounts and sessions")."""

    session_idle_minutes: float = 30.0  # a login session unused this long is ended
    session_max_hours: float = 12.0  # absolute lifetime of a login session (and of its cookie)
    lockout_after: int = 5  # failed logins in a row before an account is locked
    lockout_base_s: float = 30.0  # first lock; doubles with each further failure
    lockout_max_s: float = 900.0  # longest lock
    cookie_secure: bool = False  # set the cookie's Secure flag (turn on behind HTTPS)
    scrypt_log2_n: int = 14  # scrypt cost of new password hashes (2**14: ~16 MiB, ~50 ms per check)
    login_attempts_keep_days: float = 90.0  # the login log's rows older than this are deleted by housekeeping; 0 = keep all


@dataclass(frozen=True)
class FineTuneConfig:
    """How a retrain fine-tunes a candidate from the current version (``retrain`` stage "train")."""

    # Measured on the flywheel simulation (benchmarks/flywheel_sim.py): 8 epochs at 0.3x lr barely
    # moved the projections, and the re-chosen score mix then often fell back to the bridge.
    epochs: int = 20  # alignment epochs from the current projections
    lr_scale: float = 1.0  # fine-tune learning rate = train.lr * lr_scale (one-cycle schedule)
    fusion_epochs: int = 15
    user_share_of_batch: float = 0.5  # expected share of users' items in a batch (rest: replay)
    max_repeat: int = 8  # users' pairs are repeated at most this often to reach that share
    local_reference_max: int = 4096  # taught images the local mix remembers, newest kept; 0 = global mix only
    caption_memory: bool = True  # serve a kNN memory of taught pictures' captions (weight chosen on users' tune pairs)
    memory_max: int = 4096  # captions the memory keeps, newest kept
    # taught pictures the memory averages; 10 (was 5): memory objective on users' tune + bootstrap val
    # 0.2763 -> 0.2781 in the trusted-annotator sim (docs/results.md, issue 10, "Second pass")
    memory_k: int = 10


@dataclass(frozen=True)
class SchedulerConfig:
    timezone: str = ""  # for retrain.cron; "" = the server's local time
    lease_ttl_s: float = 60.0  # a dead scheduler leader is replaced after this
    heartbeat_s: float = 20.0  # how often every process tries to take or renew the leader lease
    housekeeping_s: float = 600.0  # every process: expire exports, delete unrated uploads past retention


@dataclass(frozen=True)
class Config:
    profile: str = "offline"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    app: AppConfig = field(default_factory=AppConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @property
    def paths(self) -> Paths:
        """Every folder and file under ``storage.home``."""
        return Paths(self.storage.home)


_SHORT_ENV = {
    "MMAPP_HOME": ("storage", "home"),
    "MMAPP_DATABASE_URL": ("storage", "database_url"),
    "MMAPP_OPERATOR_USER": ("app", "operator_user"),
    "MMAPP_OPERATOR_PASSWORD": ("app", "operator_password"),
    "MMAPP_DEVICE": ("model", "device"),
}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Path or annotation == "Path":
        return Path(value).expanduser()
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(str(v) for v in value)
    for typ in (bool, int, float, str):
        if annotation is typ or annotation == typ.__name__:
            if typ is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"{where}: expected a boolean, got {value!r}")
                return value.lower() in ("1", "true", "yes")
            try:
                return typ(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    return value


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)}; valid: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def load_config(profile: str | None = None, *, path: str | Path | None = None,
                env: Mapping[str, str] | None = None, **section_overrides: Mapping[str, Any]) -> Config:
    """Load ``configs/<profile>.yaml`` (or ``path``), then apply environment and keyword overrides.

    ``section_overrides`` are dicts per section, e.g. ``load_config(storage={"home": tmp})``.
    """
    env = os.environ if env is None else env
    profile = profile or env.get("MMAPP_PROFILE") or "offline"
    if path is None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; valid profiles: {list(PROFILES)}")
        path = CONFIG_DIR / f"{profile}.yaml"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw.setdefault("profile", profile)

    def put(section: str, key: str, value: Any) -> None:
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value

    for var, (section, key) in _SHORT_ENV.items():
        if env.get(var):
            put(section, key, env[var])
    for var, value in env.items():
        if var.startswith("MMAPP__"):
            parts = var[len("MMAPP__"):].lower().split("__")
            if len(parts) != 2:
                raise ValueError(f"{var}: expected MMAPP__SECTION__FIELD")
            put(parts[0], parts[1], value)
    for section, values in section_overrides.items():
        for key, value in values.items():
            put(section, key, value)
    return _build(Config, raw, str(path))


def redacted(config: Config) -> dict[str, Any]:
    """The configuration as plain data with secrets masked: safe to print, log or store in a manifest."""
    data = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    for section, key in SECRET_FIELDS:
        if data[section][key]:
            data[section][key] = "***"
    data["storage"]["database_url"] = redact_url(data["storage"]["database_url"])
    return data


# scheme://user:password@host/db: everything between the user's ':' and the last '@' (greedy, so a raw
# '@' or '/' inside the password is masked too; over-masking a URL is harmless, leaking is not)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:).*@")


def redact_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``; URLs without a password unchanged."""
    return _URL_PASSWORD.sub(r"\1***@", url)
