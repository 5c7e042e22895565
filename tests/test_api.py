"""The public API (``from llmc import ...``) as a user's script sees it: from a folder outside the
checkout, from the folder above a clone named ``llmc``, and without importing the heavy layers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from llmc import CompileOptions, Engine, SamplingParams, compile_model, load
import llmc

model = sys.argv[1]
art = compile_model(model, "art", CompileOptions(opt_level=1))
with Engine.load(str(art)) as engine:
    compiled = engine.generate([[1]], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
with load(model, progress=False) as engine:   # a Hugging Face folder, compiled into the artifact cache
    loaded = engine.generate([[1]], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
assert compiled == loaded, (compiled, loaded)
print(llmc.__file__)
print(" ".join(map(str, loaded)))
"""


def _python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**env, "LLMC_ARTIFACTS": str(cwd / "cache")})


def test_public_api_from_a_folder_outside_the_checkout(stories_hf: Path, stories_expected_ids: list[int],
                                                        tmp_path: Path) -> None:
    done = _python(SCRIPT, tmp_path, str(stories_hf))
    assert done.returncode == 0, done.stderr
    package, ids = done.stdout.splitlines()
    assert package.endswith(os.path.join("llmc", "__init__.py")) and not package.startswith(str(tmp_path))
    assert [int(t) for t in ids.split()] == stories_expected_ids[:8]
    assert any((tmp_path / "cache").iterdir())


def test_a_clone_named_llmc_in_the_working_folder_does_not_shadow_the_install(tmp_path: Path) -> None:
    (tmp_path / "llmc").symlink_to(ROOT, target_is_directory=True)  # as after `git clone ... llmc` in tmp_path
    done = _python("import llmc; from llmc import Engine, load; print(llmc.__file__)", tmp_path)
    assert done.returncode == 0, (
        f"{done.stderr}\nthe editable install predates build_backend/llmc_build_backend.py: reinstall it "
        "(pip uninstall llmc; pip install -e .)")
    assert done.stdout.strip().endswith(os.path.join("llmc", "__init__.py"))


def test_import_llmc_stays_light(tmp_path: Path) -> None:
    code = ("import sys, llmc, llmc.compiler.ir; heavy = [m for m in ('torch', 'llmc.runtime.engine', 'llmc.driver') "
            "if m in sys.modules]; assert not heavy, heavy; assert set(llmc.__all__) >= {'Engine', 'load'}; "
            "llmc.SamplingParams; assert 'llmc.runtime.sampling' in sys.modules")
    done = _python(code, tmp_path)
    assert done.returncode == 0, done.stderr


def test_unknown_names_are_attribute_errors(tmp_path: Path) -> None:
    done = _python("import llmc\ntry:\n    llmc.Nope\nexcept AttributeError as e:\n    print(e)", tmp_path)
    assert "has no attribute 'Nope'" in done.stdout, done.stderr


def _readme_python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in body.split("```python\n")[1:]]


@pytest.mark.network
@pytest.mark.slow
def test_the_readme_python_api_runs_from_the_folder_above_a_clone(smollm2_gguf: Path, tmp_path: Path) -> None:
    blocks = _readme_python_blocks("Python API")
    assert len(blocks) == 2 and all("SmolLM2-135M-Instruct.Q4_1.gguf" in b for b in blocks)
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(smollm2_gguf)
    (tmp_path / "llmc").symlink_to(ROOT, target_is_directory=True)  # the clone, beside the user's script
    for block in blocks:
        done = _python(block, tmp_path)
        assert done.returncode == 0, f"{block}\n{done.stderr}"
    assert "Paris" in done.stdout  # the chat session's answer
