"""A model's speculative settings from a config file: loaded and carried to its replicas as written; the
combinations the engine cannot run refused with messages that say what to change."""

from __future__ import annotations

import pytest
import yaml

from herd.engine.speculative.config import SpeculativeConfig
from herd.platform.server import serve_config
from herd.platform.settings import HerdSettings
from herd.workers.replica_config import ReplicaArgs


def _load(tmp_path, engine):
    config = tmp_path / "herd.yaml"
    config.write_text(yaml.safe_dump({"models_dir": str(tmp_path),
                                      "models": [{"name": "scout", "path": "scout", "shards": 2, "engine": engine}]}))
    return HerdSettings.load(config)


def test_ngram_from_a_config_file_reaches_the_replicas_args(tmp_path):
    settings = _load(tmp_path, {"speculative": {"method": "ngram", "num_tokens": 4}})
    spec = settings.models[0].engine.speculative
    assert spec == SpeculativeConfig(method="ngram", num_tokens=4)
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max, spec.draft_path) == (2, 4, None)
    args = serve_config(settings)["applications"][0]["args"]
    assert args["engine"]["speculative"]["method"] == "ngram" and args["engine"]["speculative"]["num_tokens"] == 4
    assert ReplicaArgs.model_validate(args).engine.speculative == spec, "the replica reads what the file said"


def test_eagle3_with_its_draft_path_loads(tmp_path):
    spec = _load(tmp_path, {"speculative": {"method": "eagle3", "num_tokens": 3, "draft_path": "/models/eagle3"}})
    assert spec.models[0].engine.speculative.draft_path == "/models/eagle3"


def test_off_unless_set(tmp_path):
    assert _load(tmp_path, {}).models[0].engine.speculative is None


@pytest.mark.parametrize(("engine", "message"), [
    ({"speculative": {"method": "eagle3", "num_tokens": 3}}, "eagle3 needs speculative.draft_path"),
    ({"speculative": {"method": "ngram"}, "async_scheduling": True}, "speculative decoding and async_scheduling"),
    ({"speculative": {"method": "ngram", "draft_path": "/x"}}, "ngram uses no draft model"),
    ({"speculative": {"method": "medusa"}}, "ngram"),
    ({"speculative": {"method": "ngram", "num_tokens": 17}}, "num_tokens"),
    ({"speculative": {"method": "ngram", "prompt_lookup_min": 5}}, "prompt_lookup_min 5 is above"),
    ({"speculative": {"num_tokens": 3}}, "method"),
    ({"speculative": {"method": "ngram", "k": 3}}, "k"),
])
def test_what_cannot_run_is_refused_saying_why(tmp_path, engine, message):
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, engine)
