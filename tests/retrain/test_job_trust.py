"""A whole retrain run under the trust rules: one trusted annotator teaches the model alone, and a
sybil script with 100 sessions gets nothing into training or the caption bank."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.accounts import Accounts, AuthPolicy
from feedback_db.models import Correction, RejectedItem
from retrain.job import run_retrain

from .world import N_CORPUS, add_feedback, feed_new_concepts, make_config

WRONG = ["a garbage fire", "garbage on fire", "a burning garbage heap", "a fire in the garbage", "trash fire",
         "a burning trash can", "a dumpster fire", "burning rubbish", "a rubbish fire", "fire and garbage"]


def test_one_trusted_annotator_teaches_alone_and_a_sybil_script_gets_nothing_in(engine, source, home):
    config = make_config(home, anonymous_rule="trusted_agreement")  # the shipped default
    Accounts(engine, AuthPolicy(scrypt_log2_n=10)).create("user0", "trusted", "a long enough password")
    feed_new_concepts(engine, source, 120, users=1)  # 120 honest corrections, all from trusted "user0"
    kind = N_CORPUS + 1  # the picture kind the script attacks
    for n in range(300):  # 100 sessions x 3: one wrong caption in ten wordings on 30 pictures of that kind
        add_feedback(engine, source, concept=kind, i=20000 + n % 30, user=f"bot{n % 100}", text=WRONG[n % 10])
    for n in range(100):  # and the same 100 sessions push one wrong label onto one meme
        add_feedback(engine, source, concept=kind, i=30000, user=f"bot{n}", field="label", kind="meme",
                     label="dark humor", meme_text="when the build is green")

    out = run_retrain(config, engine, features=source)
    assert out.status == "promoted", out.message
    with Session(engine) as s:
        rows = s.scalars(select(Correction)).all()
        reasons = dict(s.execute(select(RejectedItem.correction_id, RejectedItem.reason)
                                 .where(RejectedItem.run_id == out.run_id)).all())
        bank = repo.used_caption_corrections(s)
    trusted = [c for c in rows if c.user == "user0"]
    sybil = [c for c in rows if (c.user or "").startswith("bot")]
    assert len(sybil) == 400 and all(c.status == "new" for c in sybil)  # held back, never used
    assert {reasons[c.id] for c in sybil} == {"anonymous_unconfirmed"}
    assert not any(reasons.get(c.id) == "user_share" for c in trusted)  # a trusted annotator is never capped
    assert sum(c.status == "used" for c in trusted) >= 0.6 * len(trusted)  # chance agreement may still drop some
    assert not any(w in text for text in bank for w in ("garbage", "fire", "rubbish"))
