"""A job's result as the API shows it: no interpreter or library versions, no server paths,
but the tenant's own names (its model path, data files) as it wrote them."""

from __future__ import annotations

from shortened.redact import redact_result, spec_strings


def test_versions_and_server_paths_go_the_tenants_names_stay() -> None:
    spec = {"model": "/data/models/llama", "calibration": {"source": "s3://b/calib.jsonl"}}
    report = {
        "model": "/data/models/llama",
        "calibration": {"source": "s3://b/calib.jsonl", "windows": [10, 128]},
        "versions": {"python": "3.11.7", "torch": "2.13.0"},
        "outputs": {"cpt_model": "/srv/shortened/var/tmp/job-1/output/cpt"},
        "stages": [{"versions": {"peft": "0.13"}, "note": "saved to /srv/shortened/var/x/y"}],
        "block_scores": [1.5, None, 2.0],
    }
    shown = redact_result(report, spec_strings(spec))
    assert shown["model"] == "/data/models/llama"
    assert shown["calibration"] == {"source": "s3://b/calib.jsonl", "windows": [10, 128]}
    assert "versions" not in shown and "versions" not in shown["stages"][0]
    assert shown["outputs"]["cpt_model"] == "<path>"
    assert shown["stages"][0]["note"] == "saved to <path>"
    assert shown["block_scores"] == [1.5, None, 2.0]
