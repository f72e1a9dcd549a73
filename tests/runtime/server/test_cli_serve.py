"""`compactai serve` refuses bad input with exit 2 and one line, before binding any port."""

from __future__ import annotations

from pathlib import Path

import pytest

from compactai.cli import main
from tests.runtime.conftest import tiny_model


@pytest.mark.parametrize(("args", "says"), [
    (["missing.onnx"], "Not found"),
    (["{model}", "--min-confidence", "0.5"], "need --fallback-url"),
    (["{model}", "--fallback-url", "ftp://x", "--min-confidence", "0.5"], "http(s) URL"),
    (["{model}", "--fallback-url", "http://127.0.0.1:9", "--min-confidence", "1.5"], "(0, 1]"),
    (["{model}", "--token-file", "{short}"], "at least 16"),
    (["{model}", "--max-batch", "0"], "--max-batch"),
    (["{model}", "--workers", "0"], "--workers"),
    (["{model}", "--fallback-url", "http://127.0.0.1:9", "--fallback-rule", "no_such_module_x:f"], "fallback-rule"),
    (["{model}", "--update-source", "{model}"], "install directory"),
], ids=["missing", "rule-without-url", "url-scheme", "confidence-range", "short-token", "batch", "workers",
        "rule-import", "update-needs-install-dir"])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                         says: str) -> None:
    model = tiny_model(tmp_path / "m.onnx")
    short = tmp_path / "token"
    short.write_text("tooshort\n")
    argv = ["serve", *[a.format(model=model, short=short) for a in args]]
    assert main(argv) == 2
    assert says in capsys.readouterr().err
