"""The `forced-align` command line, run as a user runs it (the installed entry point, in a
subprocess) against the real graph: one file, a folder of good and bad files, a second run that
skips what was done, an interrupted batch resumed, and its display in a real pseudo-terminal
(the progress bars) and piped (plain lines).
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import fcntl
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from aligner_client import Client
from bench.long_audio import plan_recording, samples
from deployments.backends.base import SAMPLE_RATE
from tests.conftest import EVAL_DIR, TEST_QWEN3_JOB_RETENTION_S, create_api_key
from tests.support.audio import encode
from tests.support.hostile import tone_wav

pytestmark = pytest.mark.usefixtures("serve_url")

FORCED_ALIGN = str(Path(sys.executable).parent / "forced-align")
CLIPS = {"msajc003": "amongst her friends she was considered beautiful"}
QWEN3 = "/qwen3"  # the tiny-checkpoint application
LONG_SECONDS = 150.0  # over the command's 120 s: it goes as a job, with progress


def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([FORCED_ALIGN, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def cli_env(serve_url: str, key: str | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FORCED_ALIGNER_")}
    env["FORCED_ALIGNER_URL"] = serve_url
    if key is not None:
        env["FORCED_ALIGNER_API_KEY"] = key
    return env


@pytest.fixture(scope="module")
def long_recording(tmp_path_factory):
    plan = plan_recording(LONG_SECONDS, seed=13)
    folder = tmp_path_factory.mktemp("long")
    (folder / "lecture.flac").write_bytes(encode(samples(plan)[np.newaxis, :], SAMPLE_RATE, "flac"))
    return folder / "lecture.flac", plan.recording().transcript


def folder_of(tmp_path: Path, long_recording, bad: bool) -> tuple[Path, Path]:
    audio, texts = tmp_path / "audio", tmp_path / "texts"
    audio.mkdir()
    texts.mkdir()
    for stem, text in CLIPS.items():
        shutil.copy(EVAL_DIR / f"{stem}.wav", audio / f"{stem}.wav")
        (texts / f"{stem}.txt").write_text("\ufeff" + text)  # as a Windows editor saves it
    lecture, transcript = long_recording
    shutil.copy(lecture, audio / "lecture.flac")
    (texts / "lecture.txt").write_text(transcript)
    if bad:
        (audio / "notes.mp3").write_bytes(b"these are my notes, not audio\n" * 200)
        (texts / "notes.txt").write_text("my notes")
        (audio / "blip.wav").write_bytes(tone_wav(0.05))  # malware would do too, but three hits ban 127.0.0.1
        (texts / "blip.txt").write_text("a blip")
        (audio / "orphan.wav").write_bytes(tone_wav(2.0))  # no transcript
        for twin in ("dup.wav", "dup.mp3"):  # both would write dup.srt
            (audio / twin).write_bytes(tone_wav(1.0))
        (texts / "dup.txt").write_text("a tone")
    return audio, texts


def test_one_file_to_srt_and_json_on_stdout(serve_url, align_key, tmp_path):
    (tmp_path / "clip.txt").write_text(CLIPS["msajc003"])
    env = cli_env(serve_url, align_key)
    out = tmp_path / "clip.srt"
    done = run_cli([str(EVAL_DIR / "msajc003.wav"), "--text", str(tmp_path / "clip.txt"), "--format", "srt", "-o", str(out)], env)
    assert done.returncode == 0, done.stderr
    assert out.read_text().startswith("1\n") and "-->" in out.read_text()
    printed = run_cli([str(EVAL_DIR / "msajc003.wav"), "--text", str(tmp_path / "clip.txt")], env)
    assert printed.returncode == 0, printed.stderr
    assert [word["text"] for word in json.loads(printed.stdout)["words"]] == CLIPS["msajc003"].split()
    assert align_key not in done.stdout + done.stderr + printed.stderr


def test_the_key_comes_from_the_environment_or_a_file_never_the_command_line(serve_url, align_key, tmp_path):
    (tmp_path / "clip.txt").write_text(CLIPS["msajc003"])
    arguments = [str(EVAL_DIR / "msajc003.wav"), "--text", str(tmp_path / "clip.txt"), "--format", "vtt"]
    missing = run_cli(arguments, cli_env(serve_url, None))
    assert missing.returncode == 2 and "FORCED_ALIGNER_API_KEY" in missing.stderr
    key_file = tmp_path / "key"
    key_file.write_text(align_key + "\n")
    from_file = run_cli([*arguments, "--api-key-file", str(key_file)], cli_env(serve_url, None))
    assert from_file.returncode == 0 and from_file.stdout.startswith("WEBVTT"), from_file.stderr
    refused = run_cli(arguments, cli_env(serve_url, "fa_forged_key_0000"))
    assert refused.returncode == 1 and "credential" in refused.stderr.lower() and "fa_forged" not in refused.stderr
    assert run_cli([*arguments, "--api-key", align_key], cli_env(serve_url, None)).returncode == 2  # no such option


def test_a_folder_of_good_and_bad_files_then_a_second_run_skips_what_was_done(serve_url, redis_server, tmp_path, long_recording):
    audio, texts = folder_of(tmp_path, long_recording, bad=True)
    out = tmp_path / "out"
    env = cli_env(serve_url, create_api_key(redis_server, "cli-batch", ["align"], "unlimited"))
    first = run_cli(["batch", str(audio), "--transcripts", str(texts), "--out", str(out), "--format", "srt", "--concurrency", "3"], env)
    assert first.returncode == 1, first.stdout + first.stderr  # something failed
    lines = first.stdout.splitlines()
    assert sorted(path.name for path in out.iterdir()) == ["lecture.srt", "msajc003.srt"]
    assert any(line.startswith("failed  notes.mp3: The upload is not an accepted audio format") for line in lines), lines
    assert any(line.startswith("failed  blip.wav: The audio is too short to align") for line in lines), lines
    assert any(line.startswith("failed  orphan.wav: no transcript") for line in lines), lines
    assert sum(line.startswith("failed  dup.") and "dup.mp3 and dup.wav would both write dup.srt" in line for line in lines) == 2, lines
    assert lines[-1].startswith("2 done, 5 failed, 0 skipped")
    assert "\x1b[" not in first.stdout + first.stderr and "━" not in first.stdout + first.stderr  # piped: no bars
    assert "\ufeff" not in (out / "msajc003.srt").read_text() and "amongst" in (out / "msajc003.srt").read_text()
    lecture = (out / "lecture.srt").read_text()
    assert lecture.count("-->") == len(long_recording[1].split())

    second = run_cli(["batch", str(audio), "--transcripts", str(texts), "--out", str(out), "--json"], env)
    assert second.returncode == 1
    documents = [json.loads(line) for line in second.stdout.splitlines()]
    by_file = {document["file"]: document for document in documents if "file" in document}
    assert {name for name, document in by_file.items() if document["status"] == "skipped"} == {"lecture.flac", "msajc003.wav"}
    assert {name for name, document in by_file.items() if document["status"] == "failed"} == {"notes.mp3", "blip.wav", "orphan.wav", "dup.mp3", "dup.wav"}
    assert documents[-1]["summary"]["done"] == 0 and documents[-1]["summary"]["skipped"] == 2

    quiet = run_cli(["batch", str(audio), "--transcripts", str(texts), "--out", str(out), "--quiet"], env)
    assert quiet.returncode == 1 and quiet.stdout == ""
    assert sorted(line.split(":")[0] for line in quiet.stderr.splitlines()) == ["failed blip.wav", "failed dup.mp3", "failed dup.wav", "failed notes.mp3", "failed orphan.wav"]


def _active_jobs(redis_server) -> int:
    """Queued and running jobs of every owner, read from Redis: the wait does not depend on how
    quickly the service answers."""
    store = redis.Redis.from_url(redis_server.url)
    try:
        return sum(store.scard(key) for key in store.scan_iter(match="*:jobs:active:*"))
    finally:
        store.close()


def _interruptible() -> None:
    """Ctrl-C reaches the command as at a terminal. A test run started in the background of a
    shell ignores SIGINT, and a child inherits that: the batch would run on to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_interrupted_batch_resumes_with_the_job_it_had_started(serve_url, redis_server, tmp_path, long_recording):
    audio, texts = folder_of(tmp_path, long_recording, bad=False)
    out = tmp_path / "out"
    key = create_api_key(redis_server, "cli-resume", ["align"], "unlimited")
    env = cli_env(serve_url, key)
    arguments = [FORCED_ALIGN, "batch", str(audio), "--transcripts", str(texts), "--out", str(out), "--format", "vtt"]
    already_active = _active_jobs(redis_server)
    process = subprocess.Popen(
        arguments, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible
    )
    with Client(serve_url, api_key=key) as client:
        deadline = time.monotonic() + 60
        while _active_jobs(redis_server) <= already_active:
            assert time.monotonic() < deadline and process.poll() is None, "the batch never submitted its job"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stdout + stderr
        assert not (out / "lecture.vtt").exists() and not list(out.glob(".*partial"))
        resumed = run_cli(arguments[1:], env)
        jobs = list(client.jobs())
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (out / "lecture.vtt").read_text().startswith("WEBVTT") and (out / "msajc003.vtt").exists()
    assert len(jobs) == 1 and jobs[0].status == "succeeded"  # the resumed run found its job, made no second one


def test_usage_errors_exit_2_with_a_message(serve_url, align_key, tmp_path):
    env = cli_env(serve_url, align_key)
    (tmp_path / "t.txt").write_text("hello")
    for arguments, message in (
        ([str(tmp_path / "missing.wav"), "--text", str(tmp_path / "t.txt")], "no such audio file"),
        ([str(EVAL_DIR / "msajc003.wav"), "--text", str(tmp_path / "missing.txt")], "no transcript"),
        (["batch", str(tmp_path), "--transcripts", str(tmp_path), "--out", str(tmp_path / "o"), "--concurrency", "0"], "--concurrency"),
        (["batch", str(tmp_path / "nowhere"), "--transcripts", str(tmp_path), "--out", str(tmp_path / "o")], "no such folder"),
    ):
        refused = run_cli(arguments, env)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_jobs_commands_list_show_fetch_and_delete(serve_url, redis_server, tmp_path):
    key = create_api_key(redis_server, "cli-jobs", ["align"], "unlimited")
    env = cli_env(serve_url, key)
    with Client(serve_url, api_key=key) as client:
        job = client.submit(EVAL_DIR / "msajc003.wav", CLIPS["msajc003"], format="vtt")
        job.wait(poll_s=0.2, timeout_s=120)
    listed = run_cli(["jobs", "list"], env)
    assert listed.returncode == 0 and listed.stdout.split()[:2] == [job.id, "succeeded"]
    shown = json.loads(run_cli(["jobs", "show", job.id, "--json"], env).stdout)
    assert shown["id"] == job.id and shown["progress"]["audio_seconds_total"] == pytest.approx(job.info.duration)
    fetched = run_cli(["jobs", "result", job.id, "--format", "srt", "-o", str(tmp_path / "clip.srt")], env)
    assert fetched.returncode == 0 and (tmp_path / "clip.srt").read_text().startswith("1\n")
    assert run_cli(["jobs", "cancel", job.id], env).stdout.strip() == f"deleted {job.id}"
    gone = run_cli(["jobs", "show", job.id], env)
    assert gone.returncode == 1 and "No such resource" in gone.stderr


def test_a_rerun_after_its_first_job_expired_makes_a_new_one(serve_url, align_key, tmp_path):
    (tmp_path / "clip.txt").write_text(CLIPS["msajc003"])
    env = cli_env(serve_url + QWEN3, align_key)  # jobs there expire TEST_QWEN3_JOB_RETENTION_S after they end
    arguments = [str(EVAL_DIR / "msajc003.wav"), "--text", str(tmp_path / "clip.txt"), "--mode", "job", "-o", str(tmp_path / "clip.json")]
    assert run_cli(arguments, env).returncode == 0
    first = json.loads((tmp_path / "clip.json").read_text())["id"]
    time.sleep(TEST_QWEN3_JOB_RETENTION_S + 3)  # ended, then expired by the runner's sweep
    again = run_cli(arguments, env)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "clip.json").read_text())["id"] != first


def _in_a_terminal(arguments: list[str], env: dict[str, str], timeout_s: float = 240) -> tuple[int, str]:
    """Run in a real pseudo-terminal (160 x 40); everything it showed, and its exit status."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(arguments, env={**env, "TERM": "xterm-256color"}, stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    shown = bytearray()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    os.close(controller)
    return process.wait(timeout=10), shown.decode("utf-8", "replace")


def test_a_terminal_shows_progress_bars(serve_url, align_key, tmp_path, long_recording):
    audio, texts = folder_of(tmp_path, long_recording, bad=False)
    status, shown = _in_a_terminal(
        [FORCED_ALIGN, "batch", str(audio), "--transcripts", str(texts), "--out", str(tmp_path / "out"), "--poll", "0.3"], cli_env(serve_url, align_key)
    )
    assert status == 0, shown
    assert "━" in shown and "\x1b[" in shown  # rich's bars, drawn and redrawn
    assert "files" in shown and "2/2" in shown and "h audio" in shown and "ETA" in shown
    assert "  lecture.flac" in shown  # the job's own bar while it ran
    assert "2 done, 0 failed, 0 skipped" in shown
