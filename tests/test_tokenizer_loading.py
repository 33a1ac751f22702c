"""A tokenizer folder that is not one is a one-line error naming the flag, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdpipe.schemas.errors import ConfigError
from kdpipe.tokenizer_identity import load_tokenizer


@pytest.mark.parametrize("content", ["{}", "not json"])
def test_a_tokenizer_json_of_another_shape_is_one_line(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^--tokenizer .*: cannot load a tokenizer"):
        load_tokenizer(tmp_path, False, "--tokenizer")
