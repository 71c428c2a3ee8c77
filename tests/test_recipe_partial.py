"""A run kept in a directory of the repository (``--partial DIR``) and split over invocations
(``--stop-after N``), as weights/recipe/grid.py trains the design-space grid (PyTorch).

* every invocation of a 3-epoch run stopped after one epoch leaves DIR/<name>.npz (a loadable
  weights file) and DIR/<name>.json (phase, epoch, history, learning rate at the stop); the
  next invocation, with no checkpoint to find, continues from them: the step schedule where it
  stopped, the epoch count and the history; the last one writes --out and removes both files;
* a partial state of another configuration, or whose .npz is not the one it names, is refused;
  a state written with keys of older recipes resumes.
"""
from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch", reason="the training recipe needs torch (pip install -e .[train])")

from recipe_support import T, tiny_args  # noqa: E402
from xnorcdl.format import load_weights  # noqa: E402
from xnorcdl.model import load_model  # noqa: E402

import lr_schedule as S  # noqa: E402

STEPS = 2  # tiny_args: --max-steps 2


def _args(tmp_path, partial, call, epochs, *extra):
    """tiny_args for ``epochs`` epochs with --partial, and a fresh checkpoint directory per
    invocation, so that only the partial state can carry the run on."""
    args = tiny_args(tmp_path, "--partial", str(partial), *extra)
    args[args.index("--epochs") + 1] = str(epochs)
    args[args.index("--ckpt-dir") + 1] = str(tmp_path / f"ckpt{call}")
    return args


def _state(partial):
    with open(partial / "tiny.json") as f:
        return json.load(f)


def _onecycle_lr(total, after):
    """The learning rate of the default schedule (onecycle, lr 0.1, warm-up 0.15) after
    ``after`` of ``total`` steps."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    sched = S.make_sched(opt, "onecycle", 0.1, total, 0.15)
    for _ in range(after):
        opt.step()
        sched.step()
    return sched.get_last_lr()[0]


def test_interrupted_run_continues_its_schedule_from_the_partial_state(tmp_path):
    partial = tmp_path / "partial"
    out = tmp_path / "tiny.npz"
    seen = []
    for call in (1, 2, 3):
        assert T.main(_args(tmp_path, partial, call, 3, "--stop-after", "1")) == 0
        if call < 3:
            assert not out.exists()
            rec = _state(partial)
            assert (rec["state"]["phase"], rec["state"]["epoch"]) == (0, call)
            assert [h["epoch"] for h in rec["state"]["history"]] == list(range(1, call + 1))
            assert rec["state"]["history"][:len(seen)] == seen  # carried over, not redone
            seen = rec["state"]["history"]
            assert rec["lr_at_stop"] == pytest.approx(_onecycle_lr(3 * STEPS, call * STEPS),
                                                      rel=1e-12)
            spec, _ = load_weights(str(partial / "tiny.npz"))
            assert spec.provenance["partial"] == {"phase": "joint", "epoch": call, "of": 3}
            load_model(str(partial / "tiny.npz"))  # a provisional point the engine loads
    assert sorted(os.listdir(partial)) == []  # removed once --out is written
    spec, _ = load_weights(str(out))
    prov = spec.provenance
    assert prov["epochs"] == 3 and prov["steps"] == 3 * STEPS
    assert [h["epoch"] for h in prov["history"]] == [1, 2, 3]
    assert prov["history"][:2] == seen and "val_acc" in prov["history"][-1]
    assert "partial" not in prov
    load_model(str(out))


def test_separate_run_crosses_its_phases_over_invocations(tmp_path):
    """The last epoch of a phase does not end an invocation: the next phase starts in it (so
    the second invocation ends the hybrid phase, trains the exits and writes --out)."""
    partial = tmp_path / "partial"
    for call in (1, 2):
        assert T.main(_args(tmp_path, partial, call, 2, "--strategy", "separate",
                            "--exit-epochs", "1", "--stop-after", "1")) == 0
        if call == 1:
            state = _state(partial)["state"]
            assert (state["phase"], state["epoch"]) == (0, 1)
    prov = load_weights(str(tmp_path / "tiny.npz"))[0].provenance
    assert [h["phase"] for h in prov["history"]] == ["hybrid", "hybrid", "exits"]
    assert (prov["epochs"], prov["exit_epochs"]) == (2, 1)
    assert not os.listdir(partial)


def test_partial_state_of_another_configuration_is_refused(tmp_path):
    partial = tmp_path / "partial"

    def args(call, *extra):
        return _args(tmp_path, partial, call, 2, "--stop-after", "1", *extra)

    assert T.main(args(1)) == 0
    with pytest.raises(SystemExit, match=r"another configuration.*'lr': \(0.1, 0.05\)"):
        T.main(args(2, "--lr", "0.05"))
    with pytest.raises(SystemExit, match="another configuration.*seed"):
        T.main(args(3, "--seed", "4"))
    npz = partial / "tiny.npz"
    good = npz.read_bytes()
    npz.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(SystemExit, match="is missing or is not the file"):
        T.main(args(4))
    npz.write_bytes(good)
    with pytest.raises(SystemExit, match="--partial resumes a step schedule"):
        T.main(args(5, "--select-by", "exits:50"))
    with pytest.raises(SystemExit, match="--stop-after must be >= 0"):
        T.main(args(6, "--stop-after", "-1"))
    assert T.main(args(7)) == 0  # the state was left as it was, and finishes the run
    assert load_weights(str(tmp_path / "tiny.npz"))[0].provenance["epochs"] == 2


def test_partial_state_with_keys_of_older_recipes_resumes(tmp_path):
    """Options the recipe no longer has stay in the configuration of states written before
    (with their values for a run without them); only the current resume keys are compared."""
    partial = tmp_path / "partial"
    assert T.main(_args(tmp_path, partial, 1, 2, "--stop-after", "1")) == 0
    rec = _state(partial)
    rec["config"].update({"cloud_only": False, "cloud_focus": None, "hint": 0.0,
                          "hint_images": 2048, "uncropped": None})
    with open(partial / "tiny.json", "w") as f:
        json.dump(rec, f)
    assert T.main(_args(tmp_path, partial, 2, 2)) == 0
    prov = load_weights(str(tmp_path / "tiny.npz"))[0].provenance
    assert [h["epoch"] for h in prov["history"]] == [1, 2]


def test_stop_after_without_partial_resumes_from_the_checkpoint(tmp_path):
    args = tiny_args(tmp_path, "--stop-after", "1")
    args[args.index("--epochs") + 1] = "2"
    assert T.main(args) == 0 and not (tmp_path / "tiny.npz").exists()
    assert T.main(args) == 0
    prov = load_weights(str(tmp_path / "tiny.npz"))[0].provenance
    assert [h["epoch"] for h in prov["history"]] == [1, 2]


def test_bad_option_is_one_error_line_and_exit_status_2(tmp_path, capsys):
    assert T.run(tiny_args(tmp_path, "--threshold-rule", "best:1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --threshold-rule")
    assert not os.path.exists(tmp_path / "ckpt" / "last.pt")
