"""The export spec's own refusals and forms: a quantizer this service does not offer is
named with what it offers instead, and ``FORMAT:TYPE`` strings are targets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shortened.specs import ExportSpec

CALIBRATION = {"source": "data/calibration.jsonl"}


@pytest.mark.parametrize("method", ["gptq", "awq", "GPTQ", ""])
def test_an_unoffered_method_is_refused_naming_what_is_offered(method):
    target = {"format": "hf-quantized", "scheme": "w4a16", "method": method}
    with pytest.raises(ValidationError) as refused:
        ExportSpec.model_validate({"model": "m", "targets": [target], "calibration": CALIBRATION})
    [error] = refused.value.errors()
    assert error["loc"] == ("targets", 0, "method") and "AutoRound" in error["msg"]


def test_format_type_strings_are_targets():
    spec = ExportSpec.model_validate(
        {"model": "m", "targets": ["gguf:q4_k_m", "hf-quantized:w4a16"], "calibration": CALIBRATION}
    )
    assert [t.name for t in spec.targets] == ["gguf-q4_k_m", "hf-quantized-w4a16"]
    with pytest.raises(ValidationError, match="FORMAT:TYPE"):
        ExportSpec.model_validate({"model": "m", "targets": ["q4_k_m"]})
