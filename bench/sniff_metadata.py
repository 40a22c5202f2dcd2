"""Cost of skipping leading metadata in the sniffer (serve_app.media.sniff), per upload.

Run from the repository root:  .venv/bin/python -m bench.sniff_metadata [--repeats N]

Uploads are generated here: a 60 s MP3 as FFmpeg's muxer writes it (one small ID3v2.4 tag), the
same with 120 kB of cover art written by the muxer (the case that used to be refused), the same
behind a second tagger-written tag, and a tag of 20 MB in front of the audio (an extreme podcast
chapter image set; the cost of skipping must not depend on the tag's size). Each is sniffed once
to warm up, then `repeats` times; the p50 and the range of the per-call time are printed.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from serve_app.media import sniff_container
from tests.support.audio import encode, png_image, tone, with_cover_art


def _uploads() -> dict[str, bytes]:
    plain = encode(tone(60.0, 16_000), 16_000, "mp3")
    cover = encode(tone(60.0, 16_000), 16_000, "mp3", cover_art=png_image(200, noise_seed=1))
    return {
        "mp3, small tag": plain,
        "mp3, 120 kB cover (muxer)": cover,
        "mp3, two tags": with_cover_art(cover, png_image(200, noise_seed=2)),
        "mp3, 20 MB tag": with_cover_art(plain, bytes(20 * 1024 * 1024)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    repeats = parser.parse_args().repeats
    for name, upload in _uploads().items():
        demuxer = sniff_container(io.BytesIO(upload))
        timings_us = []
        for _ in range(repeats):
            started = time.perf_counter()
            sniff_container(io.BytesIO(upload))
            timings_us.append((time.perf_counter() - started) * 1e6)
        print(
            f"{name:28s} {len(upload) / 1e6:7.2f} MB -> {demuxer}: p50 {statistics.median(timings_us):7.1f} us"
            f" (min {min(timings_us):.1f}, max {max(timings_us):.1f})"
        )


if __name__ == "__main__":
    main()
