import math
import re
from pathlib import Path

import pytest

from tuning import spec as spec_mod
from tuning.spec import SpecError
from tuning.pareto import Objective

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def test_shipped_experiment_files_load():
    for f in sorted((REPO / "experiments").glob("*.toml")):
        spec = spec_mod.load(f)
        assert spec.name and spec.train.epochs >= 1, f


def test_defaults_and_values(tmp_path):
    spec = spec_mod.load(write(tmp_path, '[train]\nlr = 0.1\nepochs = 3\n'))
    assert spec.name == "exp"  # file stem
    assert spec.train.lr == 0.1 and spec.train.epochs == 3
    assert spec.data.dataset == "digits" and spec.data.val_fraction == 0.1


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    f = write(tmp_path, "[train]\nlrr = 0.1\n")
    with pytest.raises(SpecError) as e:
        spec_mod.load(f)
    msg = str(e.value)
    assert "lrr" in msg and str(f) in msg and "[train]" in msg and "lr," in msg


def test_unknown_section(tmp_path):
    with pytest.raises(SpecError, match="unknown top-level key 'trian'.*\\[train\\]"):
        spec_mod.load(write(tmp_path, "[trian]\nlr = 0.1\n"))


def test_wrong_type(tmp_path):
    with pytest.raises(SpecError, match=r"\[train\] epochs must be an integer, got str 'ten'"):
        spec_mod.load(write(tmp_path, '[train]\nepochs = "ten"\n'))
    with pytest.raises(SpecError, match="must be true or false"):
        spec_mod.load(write(tmp_path, "[data]\ndownload = 1\n"))


def test_int_accepted_for_float(tmp_path):
    assert spec_mod.load(write(tmp_path, "[train]\nlr = 1\n")).train.lr == 1.0


def test_choice_lists_allowed_values(tmp_path):
    with pytest.raises(SpecError, match="optimizer must be one of 'sgd', 'adam'"):
        spec_mod.load(write(tmp_path, '[train]\noptimizer = "rmsprop"\n'))
    with pytest.raises(SpecError, match="keep_checkpoints must be one of 'front', 'all', got str 'none'"):
        spec_mod.load(write(tmp_path, '[search]\nkeep_checkpoints = "none"\n'))
    assert spec_mod.load(write(tmp_path, "")).search.keep_checkpoints == "front"


def test_ranges(tmp_path):
    with pytest.raises(SpecError, match="val_fraction"):
        spec_mod.load(write(tmp_path, "[data]\nval_fraction = 0.0\n"))
    with pytest.raises(SpecError, match=r"ratio 1.0 is outside \[0, 1\)"):
        spec_mod.load(write(tmp_path, "[sweep]\nratios = [0.5, 1.0]\n"))
    with pytest.raises(SpecError, match="needs path"):
        spec_mod.load(write(tmp_path, '[data]\ndataset = "npz"\n'))


def test_overrides_are_validated_like_the_file(tmp_path):
    f = write(tmp_path, "[train]\nlr = 0.1\n")
    spec = spec_mod.load(f, ["train.lr=0.5", "data.dataset=npz", "data.path=x.npz", "sweep.ratios=[0.0, 0.3]"])
    assert spec.train.lr == 0.5 and spec.data.dataset == "npz" and spec.sweep.ratios == [0.0, 0.3]
    assert Path(spec.data.path).is_absolute()  # resolved for Ray workers
    with pytest.raises(SpecError, match="unknown key 'nope'"):
        spec_mod.load(f, ["train.nope=1"])
    with pytest.raises(SpecError, match="epochs must be an integer"):
        spec_mod.load(f, ["train.epochs=abc"])
    with pytest.raises(SpecError, match="section.key=value"):
        spec_mod.load(f, ["train.epochs"])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        spec_mod.load(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="not valid TOML"):
        spec_mod.load(write(tmp_path, "[train\n"))


def test_round_trip(tmp_path):
    spec = spec_mod.load(write(tmp_path, "[train]\nlr = 0.3\n"))
    assert spec_mod.from_dict(spec.to_dict()).to_dict() == spec.to_dict()


def test_storage_path_default_from_env_and_object_stores_need_a_study_database(tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNETUNE_STUDY_STORAGE", raising=False)
    monkeypatch.setenv("PRUNETUNE_STORAGE_PATH", str(tmp_path / "shared"))
    assert spec_mod.from_dict({}).search.storage_path == str(tmp_path / "shared")
    # a file that sets it wins over the environment
    assert spec_mod.from_dict({"search": {"storage_path": str(tmp_path / "mine")}}).search.storage_path == str(
        tmp_path / "mine")
    monkeypatch.delenv("PRUNETUNE_STORAGE_PATH")
    assert spec_mod.from_dict({}).search.storage_path == str(Path("ray_results").resolve())
    # an object store has no file system for the study's optuna.db: it needs a database server
    with pytest.raises(SpecError, match="storage_path 's3://bucket/x' is an object store, where the Optuna study "
                                        "cannot be a SQLite file: give the study a database server"):
        spec_mod.from_dict({"search": {"storage_path": "s3://bucket/x"}})
    spec = spec_mod.from_dict({"search": {"storage_path": "s3://bucket/x", "study_storage": "postgresql://o@db/o"}})
    assert spec.search.storage_path == "s3://bucket/x"


def test_objectives_are_parsed_on_load_and_written_back(tmp_path):
    spec = spec_mod.load(write(tmp_path, '[search]\nobjectives = ["accuracy:max", "size_mb:min"]\n'))
    assert spec.search.objectives == [Objective("accuracy", "max"), Objective("size_mb", "min")]
    assert spec.search.objectives[1].metric == "size_mb" and spec.search.objectives[1].direction == "min"
    assert spec.to_dict()["search"]["objectives"] == ["accuracy:max", "size_mb:min"]
    with pytest.raises(SpecError, match=r"\[search\] objectives\[0\]: objective 'speed:max' must be METRIC:max"):
        spec_mod.load(write(tmp_path, '[search]\nobjectives = ["speed:max"]\n'))


def test_replace_validates_like_a_file(tmp_path):
    spec = spec_mod.load(write(tmp_path, "[sweep]\nratios = [0.0, 0.5]\n"))
    changed = spec_mod.replace(spec, {"sweep.ratios": [0.0, 0.3], "sweep.int8": True}, source="options")
    assert changed.sweep.ratios == [0.0, 0.3] and changed.sweep.int8 and spec.sweep.ratios == [0.0, 0.5]
    with pytest.raises(SpecError, match=r"^options: \[sweep\] ratio 1.2 is outside \[0, 1\)"):
        spec_mod.replace(spec, {"sweep.ratios": [1.2]}, source="options")
    with pytest.raises(SpecError, match=r"^options: unknown key 'nope' in \[sweep\]"):
        spec_mod.replace(spec, {"sweep.nope": 1}, source="options")


def test_parse_ratios():
    assert spec_mod.parse_ratios("0:0.8:0.2") == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert spec_mod.parse_ratios("0.5,0,0.5") == [0.0, 0.5]
    for bad in ("a:b", "0:0.8:0", "0,x"):
        with pytest.raises(SpecError, match="use start:stop:step"):
            spec_mod.parse_ratios(bad)


@pytest.mark.parametrize("section, key, value, message", [
    ("search", "max_latency_ms", "0", "max_latency_ms must be > 0"),
    ("search", "max_accuracy_drop", "-0.1", "max_accuracy_drop >= 0 (inf: no budget)"),
    ("search", "min_accuracy", "1.5", "min_accuracy must be < 1"),
    ("search", "finetune_epochs", "-1", "finetune_epochs must be >= 0"),
    ("sweep", "distill_weight", "1.5", "distill_weight must be in [0, 1]"),
    ("sweep", "round_to", "0", "round_to must be >= 1"),
    ("sweep", "runtime", "tensorrt", "runtime must be one of 'torch', 'onnxruntime'"),
])
def test_new_keys_are_checked(tmp_path, section, key, value, message):
    f = tmp_path / "e.toml"
    f.write_text("")
    with pytest.raises(SpecError, match=re.escape(message)):
        spec_mod.load(f, [f"{section}.{key}={value}"])


def test_budgets_default_to_none_and_take_inf(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text("[search]\nmax_latency_ms = 4.5\nmax_accuracy_drop = inf\n")
    q = spec_mod.load(f).search
    assert q.max_latency_ms == 4.5 and math.isinf(q.max_accuracy_drop) and q.min_accuracy < 0  # floor: twice chance
    with pytest.raises(SpecError, match="int8_mode = 'qat' makes torch INT8 models"):
        spec_mod.load(f, ["sweep.runtime=onnxruntime", "sweep.int8_mode=qat"])


def test_limits_are_parsed_on_load_and_written_back(tmp_path):
    spec = spec_mod.load(write(tmp_path, '[search]\nlimits = ["size_mb<=5", "throughput_ips>=1000"]\n'))
    assert [str(limit) for limit in spec.search.limits] == ["size_mb<=5", "throughput_ips>=1000"]
    assert spec_mod.from_dict(spec.to_dict()).search.limits == spec.search.limits
    with pytest.raises(SpecError, match=r"\[search\] limits\[0\]: limit 'size<=5' must be METRIC<=NUMBER"):
        spec_mod.load(write(tmp_path, '[search]\nlimits = ["size<=5"]\n'))
