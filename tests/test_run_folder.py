"""What a run folder holds, from outside, through the real CLI and scripts: a run owns its files and deletes
only those, only with train.overwrite=true; a refused command writes nothing into a folder that holds a run
(not .hydra/, not failed.json); a resume compares the config with the run's own record, finished or not;
symbolic links planted in the folder are not followed; signals and broken files give one line."""
import csv
import io
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from test_cli import ONE_THREAD, SMALL, sbn_train

ROOT = Path(__file__).resolve().parent.parent
TINY = [*SMALL, "estimator=nvil", "train.max_steps=6", "train.eval_every=3", "variance.every=0",
        "test.elbo_samples=5", "test.iwae_k=20"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (the lock file and Hydra's log aside: both are written by every command)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("run.lock", "cli.log")}


def last_line(out) -> str:
    return out.stderr.strip().splitlines()[-1]


def test_refused_resume_of_a_finished_run_changes_nothing(tmp_path):
    run = tmp_path / "run"
    assert sbn_train(*TINY, f"hydra.run.dir={run}").returncode == 0
    before = snapshot(run)
    assert ".hydra/config.yaml" in before
    out = sbn_train(*TINY, "optim.lr=0.01", f"hydra.run.dir={run}", "train.resume=true")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert last_line(out).startswith(f"sbn-train: error: cannot resume {run}: the config differs")
    assert "optim.lr: 0.0003 -> 0.01" in last_line(out)
    assert snapshot(run) == before                 # .hydra/ still says lr 0.0003; no failed.json
    same = sbn_train(*TINY, f"hydra.run.dir={run}", "train.resume=true")
    assert same.returncode == 0 and "nothing to do" in same.stdout + same.stderr, same.stderr


def test_refused_sweep_resume_leaves_the_report_as_it_was(tmp_path):
    sweep = tmp_path / "sweep"
    base = [a for a in TINY if not a.startswith("estimator=")]
    first = sbn_train("-m", "estimator=nvil,reinforce", *base, f"hydra.sweep.dir={sweep}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(sweep)
    again = sbn_train("-m", "estimator=nvil,reinforce", *base, "optim.lr=0.01", "seed=5",
                      f"hydra.sweep.dir={sweep}", "train.resume=true")
    assert again.returncode != 0, again.stderr[-2000:]
    for est in ("nvil", "reinforce"):
        assert (f"cannot resume {sweep / ('estimator=' + est)}: the config differs from the run's "
                f"(optim.lr: 0.0003 -> 0.01; seed: 0 -> 5") in again.stderr, again.stderr[-2000:]
    # the runs' files as they were (multirun.yaml is the sweep command's own record, rewritten by Hydra)
    assert {k: v for k, v in snapshot(sweep).items() if k != "multirun.yaml"} == {
        k: v for k, v in before.items() if k != "multirun.yaml"}
    rep = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep), "--out",
                          str(tmp_path / "report")], capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    with (tmp_path / "report" / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["estimator"], r["lr"], r["seed"], r["status"]) for r in rows) == [
        ("nvil", "0.0003", "0", "finished"), ("reinforce", "0.0003", "0", "finished")]


def test_resume_without_checkpoint_keeps_the_results(tmp_path):
    run = tmp_path / "run"
    assert sbn_train(*TINY, f"hydra.run.dir={run}").returncode == 0
    (run / "checkpoint.pt").unlink()                 # a finished run, its checkpoint deleted to save space
    before = snapshot(run)
    done = sbn_train(*TINY, f"hydra.run.dir={run}", "train.resume=true")
    assert done.returncode == 0 and "already finished at step 6; nothing to do" in done.stdout + done.stderr
    assert snapshot(run) == before
    changed = sbn_train(*TINY, "seed=3", f"hydra.run.dir={run}", "train.resume=true")
    assert changed.returncode == 2 and "seed: 0 -> 3" in last_line(changed), changed.stderr
    longer = sbn_train(*TINY, "train.max_steps=12", f"hydra.run.dir={run}", "train.resume=true")
    assert longer.returncode == 2, longer.stderr
    assert "Traceback" not in longer.stderr
    assert f"cannot resume {run}: it has no checkpoint.pt" in last_line(longer)
    assert "train.overwrite=true" in last_line(longer)
    assert snapshot(run) == before


def test_a_run_deletes_only_its_own_files_and_only_with_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mine = {"pretrained_model.pt": b"weights", "my_embeddings.pt": b"vectors", "notes.json": b"{}"}
    for name, data in mine.items():
        (run / name).write_bytes(data)
    assert sbn_train(*TINY, f"hydra.run.dir={run}").returncode == 0
    assert {n: (run / n).read_bytes() for n in mine} == mine
    events = sorted(run.glob("events.out.tfevents.*"))
    assert len(events) == 1 and (run / "results.json").exists()
    out = sbn_train(*TINY, f"hydra.run.dir={run}", "train.overwrite=true")
    assert out.returncode == 0, out.stderr
    assert {n: (run / n).read_bytes() for n in mine} == mine
    assert not events[0].exists() and len(list(run.glob("events.out.tfevents.*"))) == 1


def test_symbolic_links_in_the_folder_are_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(victim)
    out = sbn_train(*TINY, f"hydra.run.dir={run}")
    assert out.returncode == 2, out.stderr
    assert last_line(out) == (f"sbn-train: error: {run / 'run.lock'} is a symbolic link; a run never writes "
                              f"through one. Remove it, or set hydra.run.dir=<another folder>")
    assert victim.read_text() == "keep"
    (run / "run.lock").unlink()
    for name in ("checkpoint.pt.tmp", "best.pt.tmp", "results.json.tmp", ".checkpoint.pt.tmp"):
        (run / name).symlink_to(victim)             # the temporary names a fixed-name writer would use
    out = sbn_train(*TINY, f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr
    assert victim.read_text() == "keep"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


def test_a_refused_second_writer_writes_nothing(tmp_path):
    run = tmp_path / "run"
    assert sbn_train(*TINY, f"hydra.run.dir={run}").returncode == 0
    before = snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(run / 'run.lock')!r}, os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = sbn_train(*TINY, f"hydra.run.dir={run}", "train.resume=true")
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2, out.stderr
    assert "is in use by process" in last_line(out) and "Traceback" not in out.stderr
    assert snapshot(run) == before                   # no failed.json beside results.json, .hydra/ as it was


def _sigint_default() -> None:
    """In the child before exec: SIGINT at its default, as under a terminal. A shell without job control
    starts background commands (``make test &``) with SIGINT ignored, their children inherit that, and a
    process that starts with SIGINT ignored rightly keeps ignoring it during start-up."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_start_up_is_one_line(tmp_path):
    out = sbn_train(*TINY, f"hydra.run.dir={tmp_path / 'run'}", env={"SBN_TRAIN_KILL_AT": "start:0:SIGINT"},
                    preexec_fn=_sigint_default)
    assert out.returncode == 128 + signal.SIGINT, out.stderr
    assert "Traceback" not in out.stderr
    assert last_line(out) == "sbn-train: interrupted (SIGINT) during start-up, before training began"
    # and while the modules load (before the CLI's main function runs)
    proc = subprocess.Popen([sys.executable, "-m", "sbn_train.cli", *TINY, f"hydra.run.dir={tmp_path / 'b'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD}, preexec_fn=_sigint_default)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGINT, err
    assert err.strip().splitlines() == ["sbn-train: interrupted (SIGINT) during start-up, before training began"]


def test_broken_checkpoints_are_named_with_what_to_do(tmp_path):
    run = tmp_path / "run"
    assert sbn_train(*TINY, f"hydra.run.dir={run}").returncode == 0
    (run / "results.json").unlink()
    good = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    out = sbn_train(*TINY, f"hydra.run.dir={run}", "train.resume=true")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert last_line(out).startswith(f"sbn-train: error: cannot read checkpoint {run / 'checkpoint.pt'} "
                                     f"(the file is cut short or is not a checkpoint")
    assert "Errno" not in last_line(out) and "train.overwrite=true" in last_line(out)
    # a checkpoint of another model, without the config record that would have refused it by key
    other = tmp_path / "other"
    other.mkdir()
    full = torch.load(io.BytesIO(good), weights_only=True)
    del full["config"]
    torch.save(full, other / "checkpoint.pt")
    out = sbn_train(*[a for a in TINY if not a.startswith("model.latent_sizes")], "model.latent_sizes=[8,4]",
                    f"hydra.run.dir={other}", "train.resume=true")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = last_line(out)
    assert line.startswith(f"sbn-train: error: checkpoint {other / 'checkpoint.pt'} does not fit this run")
    assert "(size mismatch for prior_logits: " in line and "Error(s) in loading" not in line, line


class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_compare_paper_code_refuses_a_hostile_checkpoint_in_one_line(tmp_path):
    Hostile.marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    torch.save({"model": {}, "extra": Hostile()}, path)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_paper_code.py"), "--pair", "marginal",
                          "--checkpoint", str(path), "--data-dir", str(tmp_path / "nodata")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and not Hostile.marker.exists()
    assert out.stderr.strip().splitlines() == [
        f"compare_paper_code: error: cannot read checkpoint {path} (refused: the file holds objects other than "
        f"tensors, numbers and strings); pass a checkpoint.pt or best.pt written by sbn-train"]


def test_unwritable_log_file_names_the_file(tmp_path):
    run = tmp_path / "run"
    (run / "cli.log").mkdir(parents=True)              # Hydra's log file cannot be opened there
    out = sbn_train(*TINY, f"hydra.run.dir={run}")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"sbn-train: error: cannot write the log file {run / 'cli.log'}: Is a directory. Make the folder "
        f"writable, or set hydra.run.dir=<another folder>")


def _file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))


def test_a_write_that_fails_names_the_file_and_the_reason(tmp_path):
    """A file-size limit makes writes fail as a full disk does: the error is the system's (not the archive
    writer's "unexpected pos"), with the file, or where the writer gives none (TensorBoard's), the folder."""
    run, events = tmp_path / "run", tmp_path / "events"
    checkpoint = subprocess.run([sys.executable, "-m", "sbn_train.cli", *TINY, "model.latent_sizes=[40,40]",
                                 "eval.images=0", f"hydra.run.dir={run}"], capture_output=True, text=True,
                                timeout=600, env={**os.environ, **ONE_THREAD}, preexec_fn=_file_size_limit)
    assert checkpoint.returncode == 2, checkpoint.stderr
    assert last_line(checkpoint) == f"sbn-train: error: cannot write {run / 'best.pt'}: File too large"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    images = subprocess.run([sys.executable, "-m", "sbn_train.cli", *TINY, "model.latent_sizes=[40,40]",
                             f"hydra.run.dir={events}"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **ONE_THREAD}, preexec_fn=_file_size_limit)
    assert images.returncode == 2, images.stderr
    assert last_line(images) == (f"sbn-train: error: cannot write in the run folder {events}: File too large; "
                                 f"free space there, or set hydra.run.dir=<another folder>")
