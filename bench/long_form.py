"""Long-form alignment through the real graph (PocketSphinx): accuracy, linear cost, replicas, memory.

Deploys configs/serve.yaml twice on one local Ray cluster, with the long-form limits applied to
POST /v1/align (2 GiB, 10 h; the job API that will carry them does not exist yet) and a request
timeout of an hour: "/one" with one Aligner replica and "/two" with two. Every deployment asks
Ray for fractional CPUs as configs/serve.yaml does (Aligner 0.5, Ingress and Scanner 0.25 each)
on a cluster of 4 logical CPUs over this machine's 2 cores; PocketSphinx uses one thread, so two
Aligner replicas can use both cores. One Ingress and one Scanner replica each, so their processes
are the ones measured.

Recordings come from bench.long_audio (the dev set's utterances, shuffled, 0.2-2 s pauses), written
as 16-bit WAV to a temporary directory and streamed to the service.

Figures and targets (exit 1 when one is missed):
- accuracy on the 30 min and 2 h recordings: mean boundary error <= 1.1x the same utterances
  aligned one by one (each dev clip alone, in process), no missing word, no drift (the mean error
  of the last 10 % of words within 5 ms of the first 10 %);
- cost: real-time factor (request wall time / audio seconds, upload and scan included) of the 2 h
  file within 1.3x that of the 5 min file, on "/one"; the 2 h file on "/two" >= 1.6x faster;
- memory: the Ingress replica's RSS grows by <= 64 MiB while a 1 GiB upload streams through it
  (sampled every 20 ms; the request is then refused for its empty transcript, before any scan);
  the Scanner replica's peak RSS while it scans and decodes the 2 h file <= 1 GiB.

    .venv/bin/python -m bench.long_form [--long-minutes 120] [--skip-memory]
"""

from __future__ import annotations

import argparse
import logging
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from bench.eval_set import AccuracyReport, score_alignments
from bench.long_audio import LongRecording, plan_recording, write_wav
from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from deployments.backends.base import UnitTiming
from tests.support.cluster import application_from_yaml, deployment_of, start_ray, start_serve

TARGET_ACCURACY_RATIO = 1.1
TARGET_DRIFT_MS = 5.0
TARGET_RTF_RATIO = 1.3
TARGET_SPEEDUP = 1.6
TARGET_INGRESS_GROWTH_MIB = 64
TARGET_SCANNER_PEAK_MIB = 1024
MEMORY_UPLOAD_BYTES = 1024**3
_SAMPLE_INTERVAL_S = 0.02


def _long_form_app(name: str, aligner_replicas: int) -> dict:
    def edit(app: dict) -> None:
        with_bench_plan(app)["args"].update(backend="pocketsphinx")
        ingress = deployment_of(app, "Ingress")
        ingress["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        ingress["user_config"].update(
            max_upload_bytes=2 * 1024**3, max_audio_seconds=36_000, max_transcript_chars=700_000, max_transcript_units=150_000
        )
        ingress["user_config"]["plans"]["standard"] = {"max_audio_seconds": 1800}  # its bucket holds no more
        deployment_of(app, "Scanner")["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        deployment_of(app, "Aligner")["autoscaling_config"].update(min_replicas=aligner_replicas, max_replicas=aligner_replicas)

    return application_from_yaml(name, f"/{name}", edit)


class PeakRss:
    """The peak resident set of one process, sampled in a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRss":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(_SAMPLE_INTERVAL_S)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def _replica_pid(app: str, deployment: str) -> int:
    """The process of the one replica of `deployment` in `app` (Ray titles it ServeReplica:app:deployment)."""
    title = f"ServeReplica:{app}:{deployment}"
    matches = [process.pid for process in psutil.process_iter(["cmdline"]) if any(title in part for part in process.info["cmdline"] or [])]
    if len(matches) != 1:
        raise RuntimeError(f"expected one {title} process, found {len(matches)}")
    return matches[0]


def _align(client: httpx.Client, app: str, wav: Path, transcript: str) -> tuple[list[UnitTiming], float]:
    started = time.perf_counter()
    with wav.open("rb") as audio:  # httpx streams a file object in chunks
        response = client.post(f"/{app}/v1/align", files={"audio": ("long.wav", audio, "audio/wav")}, data={"text": transcript})
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{app}: {response.status_code} {response.text[:300]}")
    return [UnitTiming(word["text"], word["start"], word["end"], word["confidence"]) for word in response.json()["words"]], elapsed


def _one_by_one(recording_plan) -> AccuracyReport:
    """The recording's utterances aligned one by one: each dev clip alone, counted as often as it occurs."""
    from deployments.backends.pocketsphinx import PocketSphinxBackend

    backend = PocketSphinxBackend()
    answers = {index: backend.align_batch([utterance.job()])[0] for index, utterance in enumerate(recording_plan.source)}
    return score_alignments([(recording_plan.source[index].words, answers[index]) for index in recording_plan.order])


def _accuracy(recording: LongRecording, hypothesis: list[UnitTiming]) -> tuple[AccuracyReport, float]:
    """The whole file's report, and the drift: mean error of the last 10 % of words minus the first 10 %."""
    tenth = max(len(recording.words) // 10, 1)
    first = score_alignments([(recording.words[:tenth], hypothesis[:tenth])])
    last = score_alignments([(recording.words[-tenth:], hypothesis[-tenth:])])
    return score_alignments([(recording.words, hypothesis)]), last.mean_ms - first.mean_ms


def _streamed_upload_growth(client: httpx.Client, directory: Path) -> float:
    """Ingress RSS growth (MiB) while a 1 GiB WAV streams in; refused after it, for its empty transcript."""
    path = directory / "one-gib.wav"
    data_bytes = MEMORY_UPLOAD_BYTES - 44
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
    with path.open("wb") as wav:
        wav.write(header + b"data" + struct.pack("<I", data_bytes))
        wav.truncate(MEMORY_UPLOAD_BYTES)  # sparse: digital silence, read back as zeros
    with PeakRss(_replica_pid("one", "Ingress")) as ingress, path.open("rb") as audio:
        response = client.post("/one/v1/align", files={"audio": ("big.wav", audio, "audio/wav")}, data={"text": ""})
    path.unlink()
    if response.status_code != 422:
        raise RuntimeError(f"1 GiB upload: expected 422 for the empty transcript, got {response.status_code}")
    return ingress.growth_mib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-minutes", type=float, default=120.0)
    parser.add_argument("--skip-memory", action="store_true", help="leave out the 1 GiB upload")
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    directory = Path(tempfile.mkdtemp(prefix="bench-long-form-"))
    stack = Stack()
    start_ray()
    url = start_serve([_long_form_app("one", 1), _long_form_app("two", 2)], request_timeout_s=3600)
    plans = {minutes: plan_recording(minutes * 60, seed=11) for minutes in (5.0, 30.0, arguments.long_minutes)}
    recordings = {minutes: write_wav(plan, directory / f"{minutes:g}min.wav") for minutes, plan in plans.items()}
    missed: list[str] = []
    with httpx.Client(base_url=url, timeout=3700, headers={"Authorization": f"Bearer {stack.api_key(BENCH_PLAN)}"}) as client:
        wav = {minutes: directory / f"{minutes:g}min.wav" for minutes in plans}
        _align(client, "one", wav[5.0], recordings[5.0].transcript)  # warm-up: decoders, first calls
        _align(client, "two", wav[5.0], recordings[5.0].transcript)

        print(f"{'recording':>10} {'app':>4} {'wall s':>8} {'RTF':>7} {'mean ms':>8} {'1-by-1 ms':>9} {'ratio':>6} {'drift ms':>8} {'missing':>7}")
        rtf: dict[tuple[float, str], float] = {}
        scanner_peak_mib = 0.0
        for minutes, app in ((5.0, "one"), (30.0, "one"), (arguments.long_minutes, "one"), (arguments.long_minutes, "two")):
            recording = recordings[minutes]
            with PeakRss(_replica_pid(app, "Scanner")) as scanner:
                hypothesis, wall_s = _align(client, app, wav[minutes], recording.transcript)
            if minutes == arguments.long_minutes and app == "one":
                scanner_peak_mib = scanner.peak / 2**20
            rtf[(minutes, app)] = wall_s / recording.duration
            report, drift = _accuracy(recording, hypothesis)
            baseline = _one_by_one(plans[minutes])
            ratio = report.mean_ms / baseline.mean_ms
            print(
                f"{minutes:>8g} m {app:>4} {wall_s:>8.1f} {rtf[(minutes, app)]:>7.4f} {report.mean_ms:>8.2f}"
                f" {baseline.mean_ms:>9.2f} {ratio:>6.3f} {drift:>8.2f} {report.missing_words:>7}"
            )
            if minutes >= 30.0:
                if ratio > TARGET_ACCURACY_RATIO or report.missing_words or abs(drift) > TARGET_DRIFT_MS:
                    missed.append(f"accuracy {minutes:g} min on {app}")

        long_one, long_two = rtf[(arguments.long_minutes, "one")], rtf[(arguments.long_minutes, "two")]
        rtf_ratio, speedup = long_one / rtf[(5.0, "one")], long_one / long_two
        print(f"\nRTF {arguments.long_minutes:g} min / 5 min (one replica): {rtf_ratio:.3f} (target <= {TARGET_RTF_RATIO})")
        print(f"{arguments.long_minutes:g} min, two aligner replicas vs one: {speedup:.3f}x faster (target >= {TARGET_SPEEDUP})")
        print(f"scanner peak RSS on the {arguments.long_minutes:g} min file: {scanner_peak_mib:.0f} MiB (target <= {TARGET_SCANNER_PEAK_MIB})")
        missed += [name for name, bad in (("rtf ratio", rtf_ratio > TARGET_RTF_RATIO), ("speedup", speedup < TARGET_SPEEDUP)) if bad]
        if scanner_peak_mib > TARGET_SCANNER_PEAK_MIB:
            missed.append("scanner memory")
        if not arguments.skip_memory:
            growth = _streamed_upload_growth(client, directory)
            print(f"ingress RSS growth while a 1 GiB upload streams: {growth:.1f} MiB (target <= {TARGET_INGRESS_GROWTH_MIB})")
            if growth > TARGET_INGRESS_GROWTH_MIB:
                missed.append("ingress memory")
    print("\nmissed: " + (", ".join(missed) if missed else "none"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
