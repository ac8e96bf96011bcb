"""The explorer at 80x24, 120x40 and 200x50: every tensor row shows its shape whatever panes are
open, siblings never read the same, the side panes take only what the tree can spare."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import settle
from modelscope_tui.tui.app import MscopeApp
from modelscope_tui.tui.panes import DETAILS, GPU_COMPACT, GPUS, fit_panes
from modelscope_tui.tui.widgets.tree import NAME_MIN, name_cells, plan_layout, shape_text, shorten

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_models"
SIZES = [(80, 24), (120, 40), (200, 50)]
LAYOUT_SAMPLES = ["llama_tiny.safetensors", "notebook_full.pt", "transformer_tied.pt"]
WIDTHS = {"shape": 7, "dtype": 8, "numel": 5, "bytes": 8}


# -- the plan, without a terminal ----------------------------------------------------------------
@pytest.mark.parametrize("width", range(20, 201, 3))
@pytest.mark.parametrize("depth", [1, 3, 6, 9])
def test_shape_is_the_last_column_standing(width, depth):
    layout = plan_layout(width, {depth: NAME_MIN}, WIDTHS)
    keys = [k for k, _ in layout.columns]
    assert "shape" in keys
    # columns go in priority order: a column is shown only if every one before it is
    priority = ["shape", "dtype", "train", "numel", "bytes"]
    assert keys == [k for k in ("shape", "dtype", "train", "numel", "bytes") if k in keys]
    assert priority[: len(keys)] == sorted(keys, key=priority.index)


def test_indentation_narrows_before_dtype_or_train_goes():
    wide = plan_layout(200, {6: NAME_MIN}, WIDTHS)
    assert wide.guide == 3 and len(wide.columns) == 5
    # at depth 6 three cells of indentation per level leave no room for shape, dtype and train;
    # two do (margin 2, icon 2, shape 7 + 1, dtype 8 + 1, train 5 + 1)
    width = 2 + 2 + 6 * 2 + NAME_MIN + 8 + 9 + 6
    narrow = plan_layout(width, {6: NAME_MIN}, WIDTHS)
    assert narrow.guide == 2 and [k for k, _ in narrow.columns] == ["shape", "dtype", "train"]
    assert plan_layout(width + 6, {6: NAME_MIN}, WIDTHS).guide == 3
    less = plan_layout(width - 1, {6: NAME_MIN}, WIDTHS)
    assert less.guide == 2 and [k for k, _ in less.columns] == ["shape", "dtype"]
    last = plan_layout(width - 10, {6: NAME_MIN}, WIDTHS)
    assert [k for k, _ in last.columns] == ["shape"]


def test_short_names_deep_down_leave_room_for_columns():
    """Only the name that needs most counts: a long root name and short leaves deep down."""
    names = {0: 40, 1: 9, 6: 6}  # `weight` at depth 6
    keys = [k for k, _ in plan_layout(60, names, WIDTHS).columns]
    assert keys == ["shape", "dtype", "train", "numel"]
    assert name_cells(names, 3) == max(NAME_MIN, 3 + 9, 18 + 6)


def test_diff_mode_keeps_the_change_column_after_dtype():
    width = 2 + 2 + 2 * 3 + NAME_MIN + 8 + 9 + 13  # margin, icon, guides, name, shape, dtype, change
    keys = [k for k, _ in plan_layout(width, {2: NAME_MIN}, WIDTHS, diff=True).columns]
    assert keys == ["shape", "dtype", "change"]  # train and bytes went first
    keys = [k for k, _ in plan_layout(width + 6, {2: NAME_MIN}, WIDTHS, diff=True).columns]
    assert keys == ["shape", "dtype", "train", "change"]


@pytest.mark.parametrize(
    "names",
    [
        ["in_proj_weight", "in_proj_bias", "out_proj"],
        ["running_mean", "running_var", "num_batches_tracked", "weight", "bias"],
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        ["encoder_attention_layernorm", "encoder_ffn_layernorm", "encoder_output_layernorm"],
        ["input_layernorm", "post_attention_layernorm", "self_attn", "mlp"],
        ["layer_0001_weight", "layer_0002_weight", "layer_0003_weight"],
    ],
)
@pytest.mark.parametrize("width", [4, 6, 8, 10, 12])
def test_shortened_siblings_stay_apart(names, width):
    shown = [shorten(n, width, names) for n in names]
    assert all(len(s) <= width for s in shown)
    assert len(set(shown)) == len(shown), dict(zip(names, shown))


def test_shortening_keeps_both_ends():
    assert shorten("in_proj_weight", 8, ["in_proj_weight", "in_proj_bias"]) == "in_…ight"
    assert shorten("in_proj_bias", 8, ["in_proj_weight", "in_proj_bias"]) == "in_…bias"
    assert shorten("running_mean", 9, ["running_mean", "running_var"]) == "runn…mean"
    assert shorten("weight", 9, ["weight"]) == "weight"  # fits: untouched


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from(["attn", "mlp", "proj", "norm", "layer", "0", "1", "12", "weight", "bias", "q", "k"]), min_size=1, max_size=6).map("_".join),
        min_size=2,
        max_size=12,
        unique=True,
    ),
    st.integers(min_value=6, max_value=20),
)
def test_shortened_names_of_any_siblings_differ(names, width):
    shown = [shorten(n, width, names) for n in names]
    assert all(len(s) <= width for s in shown)
    assert len(set(shown)) == len(shown), dict(zip(names, shown))


@pytest.mark.parametrize("width", [80, 100, 120, 160, 200])
@pytest.mark.parametrize("details", [False, True])
@pytest.mark.parametrize("gpus", [False, True])
def test_panes_take_only_what_the_tree_spares(width, details, gpus):
    need = 55
    fit = fit_panes(width, need, details, gpus)
    taken = (fit.details or 0) + (fit.gpus or 0)
    assert taken <= width - need
    for pane in fit.closed:
        assert {DETAILS: details, GPUS: gpus}[pane]
    if width >= 200:
        assert not fit.closed  # a wide terminal has room for everything


def test_the_pane_just_opened_stays_and_the_other_goes():
    fit = fit_panes(80, 40, details=True, gpus=True, opened=GPUS)
    assert fit.closed == (DETAILS,) and fit.gpus == GPU_COMPACT and fit.details is None
    fit = fit_panes(80, 40, details=True, gpus=True, opened=DETAILS)
    assert fit.closed == (GPUS,) and fit.details is not None


def test_a_deeper_row_narrows_panes_but_never_closes_one():
    fit = fit_panes(100, 90, details=True, gpus=False, may_close=False)
    assert fit.details is not None and not fit.closed


# -- the explorer, driven with Pilot ----------------------------------------------------------------
def rows(app) -> list[tuple[object, str]]:
    """(node, text) for every line of the tree as the screen shows it: guides, label and
    columns, cut at the tree's width (scrolled to each line in turn)."""
    tree = app.tree
    out = []
    for y, line in enumerate(tree._tree_lines):
        strip = tree._render_line(y, 0, tree.size.width, tree.rich_style)
        out.append((line.node, "".join(segment.text for segment in strip)))
    return out


async def show_panes(app, pilot, details: bool, gpus: bool) -> None:
    if app.query_one("#details-pane").display != details:
        await pilot.press("d")
    if app.query_one("#gpu-panel").display != gpus:
        await pilot.press("g")
    await settle(pilot)
    await pilot.pause()


def name_cell(tree, node, text: str) -> str:
    """The name as a row shows it: after the guides and the expand icon, before the columns."""
    label = text[node.data.depth * tree.guide_depth :]
    return label[2 : len(label) - tree.layout.fixed].rstrip()


def check_every_row(app) -> None:
    tree = app.tree
    header = str(app.query_one("#columns").render())
    assert "name" in header and "shape" in header, header
    for node, text in rows(app):
        row = node.data
        assert len(text) <= tree.size.width
        if row is None or row.tensor is None:
            continue
        t = row.tensor
        shape = shape_text(t.shape)
        assert f" {shape} " in text + " ", f"{t.name}: shape {shape} missing in {text!r}"
        leaf = t.name.rsplit(".", 1)[-1]
        cell = name_cell(tree, node, text)
        assert cell[:1] in (leaf[:1], "…") and len(cell) >= min(len(leaf), 4), (leaf, text)


@pytest.mark.parametrize("sample", LAYOUT_SAMPLES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_no_tensor_row_lacks_its_shape_with_any_panes(sample, size, monkeypatch):
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "1")
    app = MscopeApp(SAMPLES / sample, gpu_interval=60, show_gpus=False)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        await pilot.press("e")  # every row, down to the deepest
        await pilot.pause()
        for details in (False, True):
            for gpus in (False, True):
                await show_panes(app, pilot, details, gpus)
                check_every_row(app)
                shown = app.query_one("#details-pane").display, app.query_one("#gpu-panel").display
                if size[0] >= 200:
                    assert shown == (details, gpus)  # room for everything: nothing closed
                if any(shown):
                    assert app.tree.size.width + 2 >= app.tree.needed_width() or size[0] < 120


async def test_a_pane_that_does_not_fit_closes_with_a_hint_and_comes_back(monkeypatch):
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "1")
    app = MscopeApp(SAMPLES / "llama_tiny.safetensors", gpu_interval=60, show_gpus=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("e", "d")
        await settle(pilot)
        assert app.query_one("#details-pane").display
        await pilot.press("g")
        await settle(pilot)
        assert app.query_one("#gpu-panel").display and not app.query_one("#details-pane").display
        assert any("details pane hidden" in n.message for n in app._notifications)
        await pilot.press("g")  # the GPU panel goes: the details pane, still wanted, returns
        await settle(pilot)
        assert app.query_one("#details-pane").display


async def test_panes_hidden_for_room_return_when_the_terminal_grows(monkeypatch):
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "1")
    app = MscopeApp(SAMPLES / "llama_tiny.safetensors", gpu_interval=60, show_gpus=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("e", "d", "g")
        await settle(pilot)
        details, panel = app.query_one("#details-pane"), app.query_one("#gpu-panel")
        assert panel.display and not details.display
        await pilot.resize_terminal(200, 50)
        await settle(pilot)
        assert panel.display and details.display and not panel.compact
        assert app.tree.size.width >= app.tree.wanted_width() - 2
        await pilot.resize_terminal(80, 24)  # narrow again: the GPU panel goes first, with a hint
        await settle(pilot)
        assert details.display != panel.display
        assert any("hidden" in n.message for n in app._notifications)


def sibling_names(app) -> dict[object, list[tuple[str, str]]]:
    """parent node -> [(name, name cell as shown)] for every row."""
    tree = app.tree
    out: dict[object, list[tuple[str, str]]] = defaultdict(list)
    for node, text in rows(app):
        row = node.data
        if row is None or node.parent is None or row.more_of is not None:
            continue
        name = row.tensor.name.rsplit(".", 1)[-1] if row.tensor is not None else row.module.short_name
        out[node.parent].append((name, name_cell(tree, node, text)))
    return out


@pytest.fixture
def long_names(tmp_path):
    """Siblings that share long prefixes and suffixes, deep in the tree."""
    import torch
    from safetensors.torch import save_file

    deep = "model.encoder.layers.11.block"
    names = [
        "self_attention_in_proj_weight",
        "self_attention_in_proj_bias",
        "encoder_attention_layernorm_weight",
        "encoder_ffn_layernorm_weight",
        "batch_norm_running_mean",
        "batch_norm_running_var",
        "scripted_module_constant_0",
        "scripted_module_constant_1",
    ]
    path = tmp_path / "long.safetensors"
    save_file({f"{deep}.{n}": torch.zeros(3, 5) for n in names}, str(path))
    return path


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sample", [*LAYOUT_SAMPLES, "long"])
async def test_no_two_sibling_rows_read_the_same(sample, size, long_names, monkeypatch):
    monkeypatch.setenv("MSCOPE_SIMULATE_GPUS", "1")
    path = long_names if sample == "long" else SAMPLES / sample
    app = MscopeApp(path, gpu_interval=60, show_gpus=False)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        await pilot.press("e")
        for details, gpus in ((True, False), (True, True), (False, True)):
            await show_panes(app, pilot, details, gpus)
            for names in sibling_names(app).values():
                shown = [cell for _, cell in names]
                assert len(set(shown)) == len(shown), names
                assert all(cell for cell in shown), names
            check_every_row(app)


# -- the details pane and the header -----------------------------------------------------------------
def rendered(renderable, width: int) -> list[str]:
    from rich.console import Console

    console = Console(width=width, record=True, file=open("/dev/null", "w"), color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


@pytest.fixture(scope="module")
def notebook():
    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.training.session import Session

    return Session(open_checkpoint(SAMPLES / "notebook_full.pt"))


@pytest.mark.parametrize("width", [18, 22, 24, 27, 30, 40, 60])
def test_details_wrap_on_word_and_path_boundaries(notebook, width):
    from modelscope_tui.tui.widgets.details import module_details

    lines = rendered(module_details(notebook, notebook.node("stem")), width)
    assert all(len(line) <= width for line in lines)
    text = "\n".join(lines)
    path = "torch.nn.modules.container.Sequential"
    if width > len(path) + 2:
        assert path in text  # whole, on one line
    else:  # broken after a dot, never inside a word
        joined = "".join(line.strip() for line in lines if line.strip() and line.strip() in path)
        assert joined == path, lines
        for line in lines:
            part = line.strip()
            if part and part in path and not path.endswith(part):
                assert part.endswith("."), lines


@pytest.mark.parametrize("width", [22, 27, 40])
def test_a_value_that_does_not_fit_goes_under_its_label(notebook, width):
    from modelscope_tui.tui.widgets.details import tensor_details

    t = notebook.records["stem.0.weight"]
    lines = rendered(tensor_details(notebook, t), width)
    label = next(i for i, line in enumerate(lines) if line.startswith("saved requires_grad"))
    if width < 2 * len("saved requires_grad"):  # a label this long takes half the pane at most
        assert lines[label].rstrip() == "saved requires_grad"
        assert lines[label + 1] == f"  {t.requires_grad}"
    else:
        assert lines[label].split() == ["saved", "requires_grad", str(t.requires_grad)]
    exact = f"{t.nbytes:,} B" if t.nbytes < 1024 else f"({t.nbytes:,})"  # 288 B says it once
    assert any(exact in line for line in lines)  # exact bytes, never cut


def test_numbers_are_never_broken(notebook):
    from rich.text import Text

    from modelscope_tui.tui.widgets.details import wrap

    for width in range(4, 14):
        pieces = [p.plain.rstrip() for p in wrap(Text("cosine 0.0095006538 of 1,234,567"), width)]
        assert "0.0095006538" in pieces or width < 12, pieces
        assert all(len(p) <= width for p in pieces)


def test_root_details_give_exact_counts(notebook):
    from modelscope_tui.tui.widgets.details import file_details

    text = "\n".join(rendered(file_details(notebook), 60))
    trainable, total = notebook.totals()
    assert f"{total:,}" in text and f"{trainable:,}" in text


async def test_freezing_one_batchnorm_shows_in_the_header():
    """`trainable 1.6K / 1.6K (99.0%)` hid the change: the counts go exact when they would read
    the same."""
    app = MscopeApp(SAMPLES / "cnn_state_dict.pt", show_gpus=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.tree.reveal(module_name="features.1")
        await pilot.pause()
        await pilot.press("space")
        await pilot.pause()
        header = str(app.query_one("#header").render())
        trainable, total = app.session.totals()
        assert trainable < total
        assert f"trainable {trainable:,} / {total:,} (99.0%)" in header, header


def test_percent_says_100_and_0_only_when_exact():
    from modelscope_tui.units import count_pair, percent

    assert percent(5, 5) == "100.0%" and percent(0, 5) == "0.0%"
    assert percent(999_999, 1_000_000) == "99.9999%"
    assert percent(1, 10**7) == "0.00001%"
    assert count_pair(1_600, 2_200) == "1.6K / 2.2K"
    assert count_pair(1_594, 1_610) == "1,594 / 1,610"


def test_panes_narrow_for_what_the_tree_would_like_but_never_close_for_it():
    roomy = fit_panes(120, 40, details=True, gpus=True)
    fit = fit_panes(120, 40, details=True, gpus=True, tree_wants=46)
    assert not fit.closed and fit.details is not None and fit.gpus is not None
    assert fit.details < roomy.details and 120 - fit.details - fit.gpus >= 46
    tight = fit_panes(80, 40, details=True, gpus=False, tree_wants=70)
    assert tight.details == 24 and not tight.closed  # narrowed to its minimum, still shown


# -- diff mode: the change column has the room shape has ------------------------------------------
@pytest.fixture(scope="module")
def diff_files(tmp_path_factory):
    """(A, B) pairs: the small diffpair, and llama_tiny against a copy with one tensor moved
    (deep Hugging Face names: the tree needs most of 80 columns)."""
    from safetensors.torch import load_file, save_file

    from diffpair import write_pair

    folder = tmp_path_factory.mktemp("diff")
    small = write_pair(folder)
    tensors = load_file(str(SAMPLES / "llama_tiny.safetensors"))
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    save_file(tensors, str(folder / "llama_b.safetensors"))
    return {"pair": small, "llama": (SAMPLES / "llama_tiny.safetensors", folder / "llama_b.safetensors")}


@pytest.mark.parametrize("files", ["pair", "llama"])
async def test_diff_mode_keeps_the_change_column_with_details_at_80x24(diff_files, files):
    """The change column is to diff mode what shape is to the tree: with the details pane
    asked for at 80 columns it stays, and the pane gives way (with a hint) if both cannot."""
    from modelscope_tui.tui.widgets.tree import diff_cell

    a, b = diff_files[files]
    app = MscopeApp(b, compare=a, show_gpus=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("e", "d")
        await settle(pilot)
        await pilot.pause()
        details = app.query_one("#details-pane").display
        assert "change" in str(app.query_one("#columns").render())
        checked = 0
        for node, text in rows(app):
            row = node.data
            if row is None or row.tensor is None or row.ghost:
                continue
            cell, _ = diff_cell(app.diff.live.tensor(row.tensor.name))
            assert cell and cell in text, (row.tensor.name, cell, text)
            checked += 1
        assert checked
        if details:
            assert app.tree.size.width >= app.tree.needed_width() - 2
        else:  # gave way, and said why
            said = [n.message for n in app._notifications]
            assert any("no room for the details pane" in m and "changes" in m for m in said), said
        assert details == (files == "pair")  # the small pair leaves room for both
        await pilot.press("v")  # leaving diff mode: the details pane, still wanted, returns
        await settle(pilot)
        await pilot.click("#leave")
        await settle(pilot)
        assert app.diff.live is None and app.query_one("#details-pane").display


# -- wide characters: the details pane counts terminal cells ----------------------------------------
WIDE_NAME = "编码器.第一层.注意力机制.查询投影权重_🙂🙂"


@pytest.fixture(scope="module")
def wide_session(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from modelscope_tui.readers import open_checkpoint
    from modelscope_tui.training.session import Session

    path = tmp_path_factory.mktemp("wide") / "wide.safetensors"
    save_file({WIDE_NAME: torch.zeros(4, 8), "plain.weight": torch.zeros(2)}, str(path))
    return Session(open_checkpoint(path))


@pytest.mark.parametrize("width", [12, 17, 22, 27, 34, 60])
def test_details_wrap_wide_characters_by_cells(wide_session, width):
    """A CJK or emoji name takes two cells a character: wrapped by characters it overflowed the
    pane, and rich folded the overflow into a line of its own mid-word."""
    from rich.cells import cell_len

    from modelscope_tui.tui.widgets.details import tensor_details

    lines = rendered(tensor_details(wide_session, wide_session.records[WIDE_NAME]), width)
    assert all(cell_len(line) <= width for line in lines), lines
    parts = name_pieces(lines)
    if width >= 22:  # room for every piece between dots: no break inside one
        assert all(p[-1] in "._" for p in parts[:-1]), parts


def name_pieces(lines: list[str]) -> list[str]:
    """The lines WIDE_NAME takes under or beside its `tensor` label; they join to the name."""
    start = next(i for i, line in enumerate(lines) if line.startswith("tensor"))
    parts, i = [], start
    while "".join(parts) != WIDE_NAME:
        part = (lines[i][len("tensor") :] if i == start else lines[i]).strip()
        if part or i > start:  # the label may stand alone on its line
            assert part and WIDE_NAME.startswith("".join(parts) + part), (lines, parts)
            parts.append(part)
        i += 1
    return parts


async def test_wide_name_stays_inside_the_details_pane_at_80x24(wide_session):
    from rich.cells import cell_len
    from textual.geometry import Region

    app = MscopeApp(wide_session.ckpt.path, show_gpus=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        app.tree.reveal(tensor_name=WIDE_NAME)
        await pilot.press("d")
        await settle(pilot)
        pane = app.query_one("#details-pane")
        assert pane.display
        details = app.query_one("#details")
        inner = details.size.width
        strips = details.render_lines(Region(0, 0, inner, details.size.height))  # as painted
        lines = ["".join(segment.text for segment in strip).rstrip() for strip in strips]
        assert all(cell_len(line) <= inner for line in lines), lines
        parts = name_pieces(lines)  # rich folded the overflow: `注意力机制.查询投` / `影权重_🙂🙂`
        assert all(p[-1] in "._" for p in parts[:-1]), parts


# -- the norm profile in a narrow details pane ------------------------------------------------------
def painted(widget) -> list[str]:
    from textual.geometry import Region

    strips = widget.render_lines(Region(0, 0, widget.size.width, widget.size.height))
    return ["".join(segment.text for segment in strip).rstrip() for strip in strips]


async def test_norm_profile_fits_a_narrow_details_pane_at_80x24(tmp_path):
    """40 children in a 22-cell pane: the sparkline was drawn 40 bars wide and cut; now a bar
    stands for one or two neighbours (the largest), and every child's figure is shown whole."""
    import torch
    from rich.cells import cell_len
    from safetensors.torch import save_file

    from modelscope_tui.units import SPARK

    tensors = {f"blocks.{i}.weight": torch.full((3, 3), float(i + 1)) for i in range(40)}
    tensors["blocks.17.weight"] = torch.full((3, 3), 1000.0)  # a spike: the sparkline keeps it
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    app = MscopeApp(path, show_gpus=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("d")
        app.tree.reveal(module_name="blocks")
        await settle(pilot)
        await pilot.pause()
        details = app.query_one("#details")
        inner = details.size.width
        lines = painted(details)
        assert all(cell_len(line) <= inner for line in lines), lines
        spark = next(line for line in lines if line and set(line) <= set(SPARK))
        assert inner < 40 and len(spark) == inner and spark.count(SPARK[-1]) == 1, (spark, lines)
        assert spark.index(SPARK[-1]) == next(i for i in range(inner) if i * 40 // inner <= 17 < (i + 1) * 40 // inner)
        assert "a bar: the largest of 2 children" in " ".join(line.strip() for line in lines), lines
        shown = {line.split()[0]: line.split()[-1] for line in lines if line[:1].isdigit()}
        for i in range(40):
            if str(i) in shown:  # the first PROFILE_ROWS children
                norm = torch.linalg.vector_norm(tensors[f"blocks.{i}.weight"]).item()
                assert shown[str(i)] == f"{norm:.4g}", (i, shown[str(i)])
        assert len(shown) == 24


async def test_wide_names_keep_their_cells_in_the_tree(wide_session):
    """The tree sized names by characters: `注意力机制` (10 cells) was cut to `注意力机…` while a
    column it could spare (bytes) stayed."""
    app = MscopeApp(wide_session.ckpt.path, show_gpus=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("d")
        app.tree.reveal(tensor_name=WIDE_NAME)
        await settle(pilot)
        assert app.query_one("#details-pane").display
        texts = [text for _, text in rows(app)]
        for part in WIDE_NAME.split("."):
            assert any(part in text for text in texts), (part, texts)
        leaf = next(text for text in texts if "查询投影权重" in text)
        assert "4×8" in leaf and "float32" in leaf
