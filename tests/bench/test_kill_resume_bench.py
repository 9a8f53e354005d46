"""kill -9 during training and during a checkpoint save, then resume: the short version of bench/kill_resume.py."""

from bench.kill_resume import kill_resume


def test_killed_runs_resume_to_the_same_weights(tmp_path):
    record = kill_resume(trials=2, steps=4, checkpointing_steps=2, seed=0, work=tmp_path)
    assert record["trials"] == 2 and record["killed_during_save"] >= 1
    assert record["crashed"] == 0
    assert record["torn_checkpoints"] == []
    assert record["metrics_steps_once"]
    assert record["identical"], record
