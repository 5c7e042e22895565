"""``llmc serve`` on a real model (SmolLM2-135M-Instruct, its own ChatML template) with the openai client."""

from __future__ import annotations

from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'llmc-toolchain[dev]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")

from tests.runtime.serving import ServerProcess  # noqa: E402


@pytest.mark.network
@pytest.mark.slow
def test_smollm2_chat_answers_paris(smollm2_gguf: Path, tmp_path: Path) -> None:
    from llmc.driver import CompileOptions, compile_model

    artifact = compile_model(smollm2_gguf, tmp_path / "smol", CompileOptions(quant="native"))
    with ServerProcess(artifact, log=tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["smol"]
        reply = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Name the capital of France."}],
            max_tokens=8, temperature=0)
        assert "Paris" in reply.choices[0].message.content
        assert reply.usage.prompt_tokens > 10  # the template adds SmolLM2's default system prompt
