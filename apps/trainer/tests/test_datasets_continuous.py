"""Box-action datasets: the Parquet round trip, each kind of bad action or log-density, the summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from continuous_testkit import HIGH, LOW, box_transitions
from rich.console import Console
from rlops_contracts.dataset import arrow_schema, transitions_table
from rlops_trainer import datasets
from rlops_trainer.commands.data import render_summary
from rlops_trainer.datasets import DatasetError, Transitions, validate


def with_action(t: Transitions, action: np.ndarray) -> Transitions:
    return Transitions(
        **{c: getattr(t, c) for c in datasets.COLUMNS if c != "action"}, action=action, meta=t.meta
    )


def test_round_trip_keeps_actions_as_a_fixed_size_list(tmp_path: Path) -> None:
    t = box_transitions()
    path = datasets.save(t, tmp_path / "box.parquet")
    assert pq.read_schema(path).field("action").type == pa.list_(pa.float32(), 2)
    back = datasets.load(path)
    np.testing.assert_array_equal(back.action, t.action)
    assert back.action.dtype == np.float32
    assert back.action.shape == (len(t), 2)
    assert back.fingerprint() == validate(t).fingerprint()


def test_contract_schema_for_discrete_and_box() -> None:
    assert arrow_schema(3).field("action").type == pa.int64()
    assert arrow_schema(3, action_dim=2).field("action").type == pa.list_(pa.float32(), 2)
    with pytest.raises(ValueError, match="action_dim must be None"):
        arrow_schema(3, action_dim=0)


def test_variable_size_lists_of_the_right_length_are_read(tmp_path: Path) -> None:
    t = box_transitions()
    table = datasets.to_table(t)
    i = table.schema.get_field_index("action")
    variable = pa.array(t.action.tolist(), type=pa.list_(pa.float32()))
    table = table.set_column(i, pa.field("action", variable.type), variable)
    pq.write_table(table, tmp_path / "v.parquet")
    np.testing.assert_array_equal(datasets.load(tmp_path / "v.parquet").action, t.action)


def test_a_list_of_the_wrong_length_names_the_row(tmp_path: Path) -> None:
    t = box_transitions()
    table = datasets.to_table(t)
    rows = t.action.tolist()
    rows[5] = rows[5][:1]
    bad = pa.array(rows, type=pa.list_(pa.float32()))
    table = table.set_column(table.schema.get_field_index("action"), pa.field("action", bad.type), bad)
    pq.write_table(table, tmp_path / "w.parquet")
    with pytest.raises(DatasetError, match=r"has 1 values, expected 2 \(action_space shape \[2\]\)") as e:
        datasets.load(tmp_path / "w.parquet")
    assert (e.value.column, e.value.row) == ("action", 5)
    assert str(tmp_path / "w.parquet") in str(e.value)


def test_an_integer_action_column_in_a_box_dataset_is_the_wrong_type(tmp_path: Path) -> None:
    t = box_transitions()
    table = datasets.to_table(t)
    ints = pa.array(np.zeros(len(t), dtype=np.int64))
    table = table.set_column(table.schema.get_field_index("action"), pa.field("action", ints.type), ints)
    pq.write_table(table, tmp_path / "i.parquet")
    with pytest.raises(DatasetError, match=r"expected fixed_size_list<float32>\[2\] \(Box action space\)"):
        datasets.load(tmp_path / "i.parquet")


@pytest.mark.parametrize(
    ("row", "dim", "value", "expected"),
    [
        (7, 1, np.nan, r"value nan in dimension 1 is not finite; expected a number in \[0, 1\]"),
        (9, 0, np.inf, r"value inf in dimension 0 is not finite"),
        (11, 0, 2.5, r"value 2.5 in dimension 0 is outside the action space: expected \[-2, 2\]"),
        (13, 1, -0.01, r"value -0.01 in dimension 1 is outside the action space: expected \[0, 1\]"),
    ],
)
def test_bad_actions_name_file_column_row_dimension_and_bounds(
    tmp_path: Path, row: int, dim: int, value: float, expected: str
) -> None:
    t = box_transitions()
    action = t.action.copy()
    action[row, dim] = value
    with pytest.raises(DatasetError, match=expected) as e:
        datasets.save(with_action(t, action), tmp_path / "bad.parquet")
    assert (e.value.column, e.value.row) == ("action", row)
    assert str(tmp_path / "bad.parquet") in str(e.value)
    assert "Box(low=[-2, 0], high=[2, 1])" in str(e.value)


def test_actions_within_float32_rounding_of_a_bound_are_clipped_onto_it() -> None:
    t = box_transitions()
    action = t.action.copy()
    action[0] = [2.0 * (1 + 5e-7), -5e-7]  # inside the 1e-6 relative slack of high[0] and low[1]
    action[1] = [-2.0 - 3e-6, 0.5]  # 1.5e-6 relative: outside
    with pytest.raises(DatasetError, match="outside the action space") as e:
        validate(with_action(t, action))
    assert e.value.row == 1
    action[1] = [-2.0, 0.5]
    clipped = validate(with_action(t, action)).action
    assert clipped[0, 0] == np.float32(HIGH[0])
    assert clipped[0, 1] == np.float32(LOW[1])


def test_wrong_action_shape() -> None:
    t = box_transitions()
    with pytest.raises(DatasetError, match=r"shape \(200, 3\) does not match action_space shape \[2\]") as e:
        validate(with_action(t, np.zeros((len(t), 3), dtype=np.float32)))
    assert e.value.column == "action"


def test_one_dimensional_box_actions_may_be_a_flat_column() -> None:
    t = box_transitions()
    meta = datasets.DatasetMeta(
        **{**t.meta.__dict__, "action_space": {"type": "Box", "shape": [1], "low": [-1.0], "high": [1.0]}}
    )
    flat = np.linspace(-1, 1, len(t)).astype(np.float32)
    one_d = Transitions(
        **{c: getattr(t, c) for c in datasets.COLUMNS if c != "action"}, action=flat, meta=meta
    )
    assert validate(one_d).action.shape == (len(t), 1)


def test_log_densities_may_be_positive_but_not_infinite() -> None:
    t = box_transitions()
    t.behavior_logp[:] = 3.5  # a narrow density: above 1 is fine
    assert validate(t).has_propensities
    t.behavior_logp[4] = -np.inf
    with pytest.raises(DatasetError, match="log-density -inf is not finite") as e:
        validate(t)
    assert (e.value.column, e.value.row) == ("behavior_logp", 4)


def test_inspect_reports_per_dimension_statistics_and_log_densities() -> None:
    t = box_transitions()
    action = t.action.copy()
    action[:10, 0] = HIGH[0]
    action[10:15, 0] = LOW[0]
    s = datasets.inspect(with_action(t, action))
    dims = s["actions"]["dimensions"]
    assert [d["dimension"] for d in dims] == [0, 1]
    assert dims[0]["share_at_bound"] == pytest.approx(15 / len(t))
    assert dims[0]["max"] == 2.0
    assert dims[0]["min"] == -2.0
    assert dims[1]["mean"] == pytest.approx(float(action[:, 1].astype(np.float64).mean()))
    assert dims[1]["median"] == pytest.approx(float(np.median(action[:, 1])))
    prop = s["propensity"]
    assert prop["kind"] == "log_density"
    assert prop["log_density"]["mean"] == pytest.approx(-np.log(HIGH - LOW).sum(), rel=1e-6)
    assert "per_action" not in prop
    console = Console(width=140, record=True)
    console.print(render_summary(s))
    text = console.export_text()
    assert "Actions per dimension" in text
    assert "7.5%" in text
    assert "log-density min -1.39" in text
    assert "Box([-2.0, 0.0], [2.0, 1.0], (2,))" in text


def test_contract_table_for_box_actions_matches_the_trainer_table() -> None:
    t = validate(box_transitions())
    columns = {c: getattr(t, c) for c in datasets.COLUMNS}
    table = transitions_table(t.meta.obs_dim, columns, action_dim=2)
    assert table.column("action").to_pylist() == datasets.to_table(t).column("action").to_pylist()
