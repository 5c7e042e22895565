"""``llmc serve``'s scale-out options are refused, before anything loads, where they cannot apply."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from llmc.cli import main


@pytest.mark.parametrize(("args", "message"), [
    (["a", "b"], "serving 2 models behind one endpoint needs --replicas N"),
    (["a", "--min-replicas", "1"], "--min-replicas need(s) --replicas N"),
    (["a", "--ray-address", "auto", "--cpus-per-replica", "2"], "--ray-address, --cpus-per-replica need(s)"),
    (["a", "b", "--replicas", "2", "--served-model-name", "x"], "given 1 time(s) for 2 MODEL(s)"),
])
def test_scale_out_options_without_their_mode_are_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
