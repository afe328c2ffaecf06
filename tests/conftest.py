"""Shared fixtures: the real slides in ../shared/data (never copied into the repo), CLI runner."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    """$HISTODG_TEST_DATA, else ../shared/data beside the checkout."""
    for cand in (os.environ.get("HISTODG_TEST_DATA"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "cmu_small_region.svs").is_file():
            return Path(cand)
    return None


DATA = _data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="real test slides (../shared/data) not found; set HISTODG_TEST_DATA")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if DATA is None:
        pytest.skip("real test slides (../shared/data) not found; set HISTODG_TEST_DATA")
    return DATA


@pytest.fixture(scope="session")
def cmu(data_dir) -> Path:
    return data_dir / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def bad_dir(data_dir) -> Path:
    return data_dir / "bad"


@pytest.fixture
def cli():
    """Invoke the histodg CLI in-process: cli("tile", path, "-o", out) -> click Result."""
    from histodg.cli import main

    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    threads that spin while another process holds the cores make them 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_slides(monkeypatch, tmp_path):
    """fake_slides(name, rgb, mpp, levels=1) -> a SlideJob whose slide is an in-memory pyramid
    (`MemorySlide`, no file is read): tiling and prediction run without ../shared/data."""
    from histodg.slides import opening
    from histodg.slides.backends import MemorySlide
    from histodg.slides.inputs import SlideJob

    slides = {}
    real = opening.open_slide

    def open_fake(path, backend="auto", mpp=None):
        key = Path(path).resolve()
        if key not in slides:
            return real(path, backend, mpp)
        rgb, slide_mpp, levels = slides[key]
        slide = MemorySlide(rgb, slide_mpp, path, levels=levels, tile_size=64)
        slide.set_mpp_override(mpp)
        return slide

    for module in ("histodg.tiling.runner", "histodg.inference.pipeline"):
        monkeypatch.setattr(f"{module}.open_slide", open_fake)

    def make(name: str, rgb, mpp: float | None = 0.5, levels: int = 1, **job):
        path = tmp_path / f"{name}.fake"
        path.write_bytes(b"")  # a source file to fingerprint; its pixels are `rgb`
        slides[path.resolve()] = (rgb, mpp, levels)
        return SlideJob(path, name, **job)

    return make


@pytest.fixture
def interrupt_after():
    """interrupt_after(n): a progress callback that raises KeyboardInterrupt (a Ctrl-C mid-slide)
    once n windows are done."""

    def make(n: int):
        seen = {"n": 0}

        def progress(total=None, done=None, advance=None):
            seen["n"] += advance or 0
            if seen["n"] >= n:
                raise KeyboardInterrupt

        return progress

    return make
