"""Latency of the scanner's checks: sniff + clamd scan + decode + resample to 16 kHz, refusing
bombs, and the peak memory of the hostile-input corpus.

Run from the repository root:  .venv/bin/python -m bench.scanner_decode [--repeats N] [--no-clamd]

Speech comes from the eval set (../shared/eval/emuR_ae), tiled to length; bombs are hand-built
silent FLACs. Each case is run once to warm up, then timed; wall-clock p50 and p95 are printed with
PASS/FAIL against the p50 target, and the CPU-time p50 beside them (steadier on a shared host).

The clamd INSTREAM scan of the whole upload is included: the bench starts its own clamd
(tools.local_services, the generated test signatures) in a temporary directory; clamd's time is
wall time in another process, so it shows in the wall p50, not in the CPU p50. --no-clamd leaves
it out. Uploads go through a temporary spool (serve_app.media.spool) as in the service: the
upload and its decoded PCM are files, read and written in chunks. Finally the hostile corpus
(tests.support.hostile) runs through sniff + clamd + decode in a fresh process, whose peak RSS is reported against the 500 MB target, with the slowest refusal.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from serve_app.media import DecodeLimits, MediaRejected, Spool, decode_audio, sniff_container
from serve_app.media.clamav import ClamdScanner
from tests.support.audio import encode, silence_flac
from serve_app.media.inspect import decode_limits
from serve_app.settings import IngressOptions, ScannerOptions
from tests.support.hostile import HOSTILE_CASES, scanner_outcome
from tools.local_services import ClamdServer

EVAL_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "eval" / "emuR_ae"
LIMITS = DecodeLimits()
ACCEPTED = "accepted"
CLAMD_TIMEOUT_S = 30.0
CORPUS_PEAK_RSS_TARGET_MB = 500
REFUSAL_TARGET_MS = 200


@dataclass(frozen=True)
class Case:
    name: str
    upload: bytes
    expected_outcome: str  # ACCEPTED, or the MediaRejected reason
    target_p50_ms: float | None  # None: reported for information only
    repeats: int


def eval_speech() -> np.ndarray:
    """All eval utterances end to end: 16 kHz mono float32, about 21 s."""
    utterances = []
    for path in sorted(EVAL_DIR.glob("*.wav")):
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray() for frame in container.decode(audio=0)]
        utterances.append(np.concatenate(frames, axis=1)[0].astype(np.float32) / 32768.0)
    if not utterances:
        raise SystemExit(f"no eval audio found in {EVAL_DIR}")
    return np.concatenate(utterances)


def speech(seconds: float, rate: int, channels: int) -> np.ndarray:
    """Eval speech tiled to `seconds`, at `rate`, with a little independent noise per channel
    (identical channels would make FLAC's stereo decorrelation unrealistically cheap)."""
    source = eval_speech()
    times = np.arange(round(seconds * rate)) / rate
    mono = np.interp(times * 16_000 % source.size, np.arange(source.size), source)
    noise = np.random.default_rng(0).normal(0.0, 0.003, (channels, mono.size))
    return (mono + noise).astype(np.float32)


def build_cases(repeats: int) -> list[Case]:
    wav_30s = encode(speech(30, 16_000, 1), 16_000, "wav")
    flac_5min = encode(speech(300, 16_000, 1), 16_000, "flac")
    flac_5min_cd = encode(speech(300, 44_100, 2), 44_100, "flac")
    bomb_16k = silence_flac(3600, 16_000, 1)
    bomb_192k = silence_flac(3600, 192_000, 8)
    bomb_16k_no_length = silence_flac(3600, 16_000, 1, declare_length=False)
    bomb_192k_no_length = silence_flac(3600, 192_000, 8, declare_length=False)
    too_long = "audio-too-long"
    # The last one can only be caught while decoding: the decoding-work cap (max_source_samples)
    # stops it after 37.5 s of 192 kHz 7.1, where the duration cap alone would decode 600 s.
    return [
        Case("30 s 16 kHz mono WAV", wav_30s, ACCEPTED, 60, repeats),
        Case("5 min 16 kHz mono FLAC", flac_5min, ACCEPTED, 400, repeats),
        Case("5 min 44.1 kHz stereo FLAC", flac_5min_cd, ACCEPTED, 400, repeats),
        Case("bomb: 1 h 16 kHz mono silence FLAC", bomb_16k, too_long, 200, repeats),
        Case("bomb: 1 h 192 kHz 7.1 silence FLAC", bomb_192k, too_long, 200, repeats),
        Case("bomb, length unknown: 1 h 16 kHz mono", bomb_16k_no_length, too_long, 200, repeats),
        Case("bomb, length unknown: 1 h 192 kHz 7.1", bomb_192k_no_length, too_long, 200, repeats),
    ]


def inspect(upload: bytes, clamd: ClamdScanner | None, spool: Spool) -> str:
    """ACCEPTED or the problem slug, as a Scanner replica decides (without clamd when None)."""
    if clamd is not None:
        return scanner_outcome(upload, clamd, LIMITS, spool) or ACCEPTED
    source = io.BytesIO(upload)
    try:
        with spool.writer("pcm") as sink:
            spool.remove(decode_audio(source, sniff_container(source), LIMITS, sink).pcm_path)
    except MediaRejected as rejection:
        return rejection.reason
    return ACCEPTED


def time_case(case: Case, clamd: ClamdScanner | None, spool: Spool) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds of each timed run (CPU time is steadier on a busy host)."""
    inspect(case.upload, clamd, spool)  # warm-up: codec tables, first allocations
    wall_ms, cpu_ms = [], []
    for _ in range(case.repeats):
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        outcome = inspect(case.upload, clamd, spool)
        wall_ms.append((time.perf_counter() - wall_started) * 1000)
        cpu_ms.append((time.process_time() - cpu_started) * 1000)
        if outcome != case.expected_outcome:
            raise SystemExit(f"{case.name}: expected {case.expected_outcome}, got {outcome}")
    return wall_ms, cpu_ms


def run_corpus(clamd_address: str, spool_directory: str) -> dict[str, float | str]:
    """In a fresh process: every hostile case through sniff + clamd + decode, checked against its
    expected outcome, then once more timed; peak RSS (after imports, and overall) and the slowest
    refusal of the timed pass."""
    clamd = ClamdScanner(clamd_address, CLAMD_TIMEOUT_S)
    spool = Spool(spool_directory)
    limits = decode_limits(ScannerOptions(), IngressOptions().max_audio_seconds)
    baseline_mb = _peak_rss_mb()
    uploads = [(case, case.build()) for case in HOSTILE_CASES]
    for case, upload in uploads:  # checks every outcome, and warms codec tables up
        outcome = scanner_outcome(upload, clamd, limits, spool)
        if outcome != case.expected_slug:
            raise SystemExit(f"{case.name}: expected {case.expected_slug}, got {outcome}")
    refusal_ms: dict[str, float] = {}
    for case, upload in uploads:
        if not case.accepted:
            started = time.perf_counter()
            scanner_outcome(upload, clamd, limits, spool)
            refusal_ms[case.name] = (time.perf_counter() - started) * 1000
    slowest_refusal = max(refusal_ms, key=refusal_ms.get)
    return {
        "baseline_mb": baseline_mb,
        "peak_mb": _peak_rss_mb(),
        "slowest_refusal_ms": refusal_ms[slowest_refusal],
        "slowest_refusal": slowest_refusal,
    }


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries the
    parent's peak into a forked-then-exec'd child's ru_maxrss, so a spawned worker would report
    the latency cases' memory instead of its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def report_corpus(clamd_address: str, spool_directory: str) -> bool:
    # A spawned process: its peak RSS is the corpus's plus the imports, not this process's history.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        corpus = pool.submit(run_corpus, clamd_address, spool_directory).result()
    memory_met = corpus["peak_mb"] < CORPUS_PEAK_RSS_TARGET_MB
    refusal_met = corpus["slowest_refusal_ms"] <= REFUSAL_TARGET_MS
    print(
        f"hostile corpus ({len(HOSTILE_CASES)} cases), fresh process: peak RSS {corpus['peak_mb']:.0f} MB"
        f" (after imports {corpus['baseline_mb']:.0f} MB)  peak < {CORPUS_PEAK_RSS_TARGET_MB} MB:"
        f" {'PASS' if memory_met else 'FAIL'}"
    )
    print(
        f"slowest refusal: {corpus['slowest_refusal']} {corpus['slowest_refusal_ms']:.1f} ms (one timed pass)"
        f"  <= {REFUSAL_TARGET_MS} ms: {'PASS' if refusal_met else 'FAIL'}"
    )
    return memory_met and refusal_met


def run_cases(repeats: int, clamd: ClamdScanner | None, spool: Spool) -> bool:
    print("sniff + clamd INSTREAM + decode + resample" if clamd else "sniff + decode + resample (no clamd)")
    header = f"{'case':44} {'upload':>9} {'p50 ms':>8} {'p95 ms':>8} {'cpu p50':>8}"
    print(f"{header}  target (wall p50)")
    all_met = True
    for case in build_cases(repeats):
        wall_ms, cpu_ms = time_case(case, clamd, spool)
        p50, p95 = np.percentile(wall_ms, [50, 95])
        if case.target_p50_ms is None:
            verdict = "info (bounded by the caps and max_wall_seconds)"
        else:
            met = p50 <= case.target_p50_ms
            all_met &= met
            verdict = f"p50 <= {case.target_p50_ms:g} ms: {'PASS' if met else 'FAIL'}"
        size_kib = len(case.upload) / 1024
        cpu_p50 = np.percentile(cpu_ms, 50)
        print(
            f"{case.name:44} {size_kib:7.0f}KiB {p50:8.1f} {p95:8.1f} {cpu_p50:8.1f}  {verdict}",
            flush=True,
        )
    return all_met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per case (default 20)")
    parser.add_argument("--no-clamd", action="store_true", help="sniff + decode only, no corpus run")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-spool-") as spool_directory:
        spool = Spool(spool_directory)
        if arguments.no_clamd:
            all_met = run_cases(arguments.repeats, None, spool)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-clamd-") as clamd_directory:
                clamd_server = ClamdServer(Path(clamd_directory)).start()
                try:
                    address = f"unix://{clamd_server.socket_path}"
                    all_met = run_cases(arguments.repeats, ClamdScanner(address, CLAMD_TIMEOUT_S), spool)
                    all_met &= report_corpus(address, spool_directory)
                finally:
                    clamd_server.stop()
    print("all targets met" if all_met else "some targets missed")


if __name__ == "__main__":
    main()
