"""inspect_adapter against hand-computed spectra and the LoRA paper's amplification factor."""

import argparse
import math

import pytest
import tiny
import torch
from torch import nn

from lorakit import LoraConfig, LoraError, add_lora, save_adapter
from lorakit.cli import lowrank as cli
from lorakit.lowrank.inspection import inspect_adapter, plot_spectra
from lorakit.targeting import iter_adapter_modules


def _one_linear(weight, r, alpha):
    """nn.Sequential(Linear) with weight ``weight`` and an adapter of rank r on it."""
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    return add_lora(model, LoraConfig(r=r, alpha=alpha, target_modules=["0"]))


def _set(model, A, B):
    with torch.no_grad():
        model[0].lora_A["default"].copy_(A)
        model[0].lora_B["default"].copy_(B)


def test_amplification_of_a_direction_w_barely_uses():
    # W = diag(10, 2, 1, 1); ΔW = 2 · 1.5 · e2 e2ᵀ = 3 e2 e2ᵀ points along W's σ=2 direction.
    model = _one_linear(torch.diag(torch.tensor([10.0, 2.0, 1.0, 1.0])), r=1, alpha=2)
    e2 = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    _set(model, A=e2, B=1.5 * e2.T)
    (m,) = inspect_adapter(model).modules
    assert (m.path, m.rank, m.scale) == ("0", 1, 2.0)
    assert m.delta_norm == pytest.approx(3.0) and m.singular_values == pytest.approx([3.0])
    assert m.effective_rank == 1
    assert m.weight_norm == pytest.approx(math.sqrt(100 + 4 + 1 + 1))
    assert m.projection == pytest.approx(2.0)  # |e2ᵀ W e2| = W[1, 1]
    assert m.top_projection == pytest.approx(10.0)  # W's own top direction
    assert m.amplification == pytest.approx(1.5)  # ‖ΔW‖ / ‖Uᵀ W V‖ = 3 / 2
    assert 0 < m.random_projection < 10.0


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_top_projection_is_the_norm_of_ws_top_r_singular_values(shape):
    # Wide and tall W: the Gram matrix is taken on the smaller side either way.
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    model = _one_linear(W, r=3, alpha=3)
    tiny.randomize_adapters(model)
    (m,) = inspect_adapter(model).modules
    expected = torch.linalg.svdvals(W.double())[:3].square().sum().sqrt().item()
    assert m.top_projection == pytest.approx(expected, rel=1e-6)


def test_off_diagonal_delta_amplifies_an_unused_direction():
    # ΔW = 4 e1 e3ᵀ: U = e1, V = e3 and W[0, 2] = 0.5, so the factor is 4 / 0.5 = 8.
    W = torch.diag(torch.tensor([10.0, 2.0, 1.0, 1.0]))
    W[0, 2] = 0.5
    model = _one_linear(W, r=1, alpha=1)
    _set(model, A=torch.tensor([[0.0, 0.0, 1.0, 0.0]]), B=torch.tensor([[4.0], [0], [0], [0]]))
    (m,) = inspect_adapter(model).modules
    assert m.projection == pytest.approx(0.5) and m.amplification == pytest.approx(8.0)


def test_singular_values_and_effective_rank():
    # ΔW = diag(3, 1, 1, 0.5) at scale 1: Σσ² = 11.25, the top three hold 97.8% (two: 88.9%).
    model = _one_linear(torch.eye(4), r=4, alpha=4)
    _set(model, A=torch.eye(4), B=torch.diag(torch.tensor([3.0, 1.0, 1.0, 0.5])))
    (m,) = inspect_adapter(model).modules
    assert m.singular_values == pytest.approx([3.0, 1.0, 1.0, 0.5])
    assert m.effective_rank == 3
    assert m.delta_norm == pytest.approx(math.sqrt(11.25))


@pytest.fixture
def adapted():
    model = add_lora(tiny.llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    tiny.randomize_adapters(model)
    return model


def test_folder_gives_the_same_spectra_as_the_model(adapted, tmp_path):
    save_adapter(adapted, tmp_path)
    from_model = {m.path: m for m in inspect_adapter(adapted).modules}
    from_files = {m.path: m for m in inspect_adapter(tmp_path).modules}
    base = tiny.llama()
    with_base = {m.path: m for m in inspect_adapter(tmp_path, base).modules}
    assert set(from_model) == set(from_files) == set(with_base) and len(from_model) == 4
    for path, m in from_model.items():
        assert from_files[path].singular_values == pytest.approx(m.singular_values, rel=1e-4)
        assert from_files[path].scale == m.scale == 2.0 and from_files[path].amplification is None
        assert with_base[path].amplification == pytest.approx(m.amplification, rel=1e-4)
    assert not list(iter_adapter_modules(base))  # the base model was not changed


def test_pissa_is_inspected_as_its_change_from_the_original_weight():
    model = add_lora(tiny.llama(), LoraConfig(r=2, target_modules=["q_proj"], init="pissa"))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.delta_weight("default").norm() > 0.1  # the principal part moved out of W
    report = inspect_adapter(model)
    assert all(m.delta_norm < 1e-5 and m.rank == 4 for m in report.modules)  # unchanged: 0
    with torch.no_grad():
        layer.lora_B["default"][:, 0] += 0.1
    (changed,) = [m for m in inspect_adapter(model).modules if m.path.startswith("model.layers.0")]
    A0 = layer.initial_lora("default")[0]
    # s · (B A − B0 A0) = s · 0.1 · 1 ⊗ A0[0]; rank one with norm s · 0.1 · √out · ‖A0[0]‖
    expected = layer.scale["default"] * 0.1 * math.sqrt(32) * A0[0].norm()
    assert changed.delta_norm == pytest.approx(float(expected), rel=1e-4)
    assert changed.effective_rank == 1


def test_report_prints_a_table(adapted):
    text = str(inspect_adapter(adapted))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["module", "r", "scale"] and "amplif." in lines[0]
    assert set(lines[1]) <= {"-", " "}
    assert sum("model.layers." in line for line in lines) == 4
    assert "effective rank" in lines[-1]


def test_bad_input_raises(adapted, tmp_path):
    with pytest.raises(LoraError, match="not a folder"):
        inspect_adapter(tmp_path / "missing")
    with pytest.raises(LoraError, match="Unknown adapter"):
        inspect_adapter(adapted, adapter_name="other")
    with pytest.raises(LoraError, match="adapter_config.json"):
        inspect_adapter(tmp_path)


def test_cli_inspect_prints_and_plots(adapted, tmp_path, capsys):
    save_adapter(adapted, tmp_path / "adapter")
    parser = argparse.ArgumentParser()
    add_arguments, run = cli.COMMANDS["inspect"]
    add_arguments(parser)
    png = tmp_path / "spectra.png"
    assert run(parser.parse_args([str(tmp_path / "adapter"), "--plot", str(png)])) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in printed and "spectra plotted" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_spectra(inspect_adapter(adapted), tmp_path / "again.png").stat().st_size > 1000


def test_spectra_plot_colours_lines_by_layer_with_a_colour_bar(adapted, tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    with pytest.raises(FileNotFoundError):  # nothing was written: the figure is inspected
        plot_spectra(inspect_adapter(adapted), tmp_path / "s.png")
    (fig,) = saved
    *panels, bar = fig.axes
    assert bar.get_ylabel() == "layer" and [t for t in bar.get_yticks() if 0 <= t <= 1] == [0, 1]
    for panel in panels:
        colours = [tuple(line.get_color()) for line in panel.get_lines()]
        assert len(set(colours)) == len(colours) == 2  # layers 0 and 1 differ
        labels = [t.get_text() for t in panel.get_yticklabels(minor=True) if t.get_text()]
        assert all("10^" not in label and "times" not in label for label in labels)


def test_modules_of_a_folder_come_in_natural_order(tmp_path):
    model = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(12)])
    add_lora(model, LoraConfig(r=1, target_modules=[str(i) for i in range(12)]))
    save_adapter(model, tmp_path)
    paths = [m.path for m in inspect_adapter(tmp_path).modules]
    assert paths == [str(i) for i in range(12)]  # 2 before 10, not text order (0, 1, 10, ...)
    rows = [line.split()[0] for line in str(inspect_adapter(tmp_path)).splitlines()[2:-1]]
    assert rows == paths


def _report(spectra: dict[str, list[float]]):
    from lorakit.lowrank.inspection import InspectReport, ModuleSpectrum

    modules = [ModuleSpectrum(p, len(s), 2.0, 1.0, s, 1) for p, s in spectra.items()]
    return InspectReport("default", modules)


def test_sigma_column_lines_up_value_under_value():
    report = _report({"a": [12.5, 0.5, 0.01], "b": [1.0, 0.25, 0.0625], "c": [100.0, 3.0]})
    lines = str(report).splitlines()
    start = lines[0].index("sigma_1..3 of dW")
    cells = [line[start : start + len("sigma_1..3 of dW")] for line in lines[2:5]]
    assert cells == [
        "12.5  0.5   0.01",
        "   1 0.25 0.0625",
        " 100    3       ",
    ]


def test_spectra_plot_tick_labels_do_not_overlap(tmp_path, monkeypatch):
    import matplotlib.figure
    import numpy as np

    spans = {
        "q_proj": (3.0, 1.5),
        "v_proj": (50.0, 1e-4),
        "o_proj": (0.9, 0.2),
        "k_proj": (20, 0.05),
    }
    report = _report(
        {
            f"model.layers.{layer}.{name}": list(np.geomspace(high, low, 16) * (1 + layer / 10))
            for name, (high, low) in spans.items()
            for layer in range(3)
        }
    )
    real, seen = matplotlib.figure.Figure.savefig, {}

    def read_back(fig, *args, **kwargs):  # the saved figure's labels, as drawn into the file
        real(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes[:-1]:
            low, high = ax.get_ylim()
            ticks = ax.get_yticklabels() + ax.get_yticklabels(minor=True)
            shown = [t for t in ticks if t.get_text() and low <= t.get_position()[1] <= high]
            seen[ax.get_title()] = [(t.get_text(), t.get_window_extent(renderer)) for t in shown]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", read_back)
    plot_spectra(report, tmp_path / "s.png")
    for title, labels in seen.items():
        clashes = [
            (a, b) for i, (a, box) in enumerate(labels) for b, other in labels[i + 1 :]
            if box.overlaps(other)
        ]  # fmt: skip
        assert len(labels) >= 2 and clashes == [], (title, [text for text, _ in labels])
        assert all("10^" not in text and "times" not in text for text, _ in labels)
    assert [t for t, _ in seen["v_proj"]] == ["0.0001", "0.001", "0.01", "0.1", "1", "10", "100"]
    assert sorted(float(t) for t, _ in seen["o_proj"]) == [0.2, 0.3, 0.5, 1.0]
