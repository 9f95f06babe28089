"""A whole retrain run under the trust rules: one trusted annotator teaches the model alone, and a
sybil script with 100 sessions gets nothing into training or the caption bank."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback_db import repository as repo
from feedback_db.accounts import Accounts, AuthPolicy
from feedback_db.models import Correction, RejectedItem
from retrain.job import run_retrain

from .world import N_CONCEPTS, N_CORPUS, add_feedback, feed_new_concepts, make_config

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


def test_quorum_copies_are_used_together_and_cap_held_items_do_not_queue_up_across_nights(engine, source, home):
    # anonymous_quorum 3, cap 10 pictures a night, held items reconsidered in one more run
    config = make_config(home, anonymous_rule="quorum", anonymous_quorum=3, max_anonymous_per_run=10,
                         anonymous_cap_holds=1)
    Accounts(engine, AuthPolicy(scrypt_log2_n=10)).create("user0", "trusted", "a long enough password")
    feed_new_concepts(engine, source, 120, users=1)  # a trusted annotator's work: enough for a held-out split
    ids_of = {}
    for j in range(30):  # 30 pictures of new concepts, each captioned alike by 3 sessions: 90 rows
        concept = N_CORPUS + 1 + j % 5
        ids_of[j] = [add_feedback(engine, source, concept=concept, i=j, user=f"s{(j + k) % 10}",
                                  text=f"a drawing of concept {concept} number {j}") for k in range(3)]

    def status_and_reasons(run_id):
        with Session(engine) as s:
            status = {c.id: c.status for c in s.scalars(select(Correction)).all()}
            reasons = dict(s.execute(select(RejectedItem.correction_id, RejectedItem.reason)
                                     .where(RejectedItem.run_id == run_id)).all())
        return status, reasons

    first = run_retrain(config, engine, features=source, force=True)
    assert first.status == "promoted", first.message
    status, reasons = status_and_reasons(first.run_id)
    assert "exact_duplicate" not in reasons.values()  # the quorum's copies are collapsed, not rejected
    capped = [j for j, ids in ids_of.items() if reasons.get(ids[0]) == "anonymous_cap"]
    assert len(capped) == 20  # the cap counts pictures: 10 let in (3 rows each), 20 held
    assert first.stats["cleaning"]["merged_copies"] >= 2 * 8  # two copies per let-in picture (chance may drop some)
    for j, ids in ids_of.items():  # the copies of one picture share its fate
        assert len({status[c] for c in ids}) == 1, (j, [status[c] for c in ids])
    assert all(status[c] == "new" for j in capped for c in ids_of[j])  # held, not rejected

    second = run_retrain(config, engine, features=source, force=True)
    status, reasons = status_and_reasons(second.run_id)
    expired = [j for j in capped if reasons.get(ids_of[j][0]) == "anonymous_cap_expired"]
    assert len(expired) == 10  # reconsidered once: 10 more let in, the other 10 rejected for good
    assert all(status[c] == "rejected" for j in expired for c in ids_of[j])


def test_a_trusted_answer_from_an_earlier_run_confirms_anonymous_ones_today(engine, source, home):
    config = make_config(home, anonymous_rule="trusted_agreement")
    accounts = Accounts(engine, AuthPolicy(scrypt_log2_n=10))
    accounts.create("user0", "trusted", "a long enough password")
    feed_new_concepts(engine, source, 120, users=1)  # Monday: the trusted annotator teaches 120 pictures
    first = run_retrain(config, engine, features=source)
    assert first.status == "promoted", first.message
    new = N_CONCEPTS - N_CORPUS
    agreeing = [add_feedback(engine, source, concept=N_CORPUS + j % new, i=5000 + j, user=f"anon{j % 7}")
                for j in range(20)]  # Tuesday: anonymous sessions give the same captions for 20 of those pictures
    wrong = [add_feedback(engine, source, concept=N_CORPUS + j % new, i=5000 + j, user=f"anon{j % 7}",
                          text=WRONG[j % 10]) for j in range(20, 30)]  # ... and wrong ones for 10 others

    second = run_retrain(config, engine, features=source, force=True)
    with Session(engine) as s:
        reasons = dict(s.execute(select(RejectedItem.correction_id, RejectedItem.reason)
                                 .where(RejectedItem.run_id == second.run_id)).all())
    with Session(engine) as s:
        monday = {c.prediction.image_sha256: c.status for c in s.scalars(select(Correction)) if c.user == "user0"}
        image_of = {c.id: c.prediction.image_sha256 for c in s.scalars(select(Correction))}
    taught = [i for i in agreeing if monday[image_of[i]] == "used"]  # (cleaning may have dropped one or two)
    assert len(taught) >= 15
    assert second.stats["cleaning"]["earlier_trusted_references"] == sum(
        monday[image_of[i]] == "used" for i in agreeing + wrong)
    assert not any(reasons.get(i) == "anonymous_unconfirmed" for i in taught)  # confirmed by Monday's answers
    assert all(reasons.get(i) == "anonymous_unconfirmed" for i in wrong)  # Monday's answers disagree: held back

    accounts.update("user0", role="rater")  # demoted: their earlier answers confirm nothing any more
    more = [add_feedback(engine, source, concept=N_CORPUS + j % new, i=5000 + j, user="anon9") for j in range(40, 45)]
    third = run_retrain(config, engine, features=source, force=True)
    with Session(engine) as s:
        reasons = dict(s.execute(select(RejectedItem.correction_id, RejectedItem.reason)
                                 .where(RejectedItem.run_id == third.run_id)).all())
    assert all(reasons.get(i) == "anonymous_unconfirmed" for i in more)
