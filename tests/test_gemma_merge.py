"""The gather step refuses pieces that disagree, naming the piece and the field."""

from __future__ import annotations

import pytest

from sheepdog.errors import GatherError
from sheepdog.gemma.scan.merge import Piece, merge

HEADER = "chr\trs\tps\tn_miss\tallele1\tallele0\taf\tbeta\tse\tl_mle\tp_lrt"


def _piece(tmp_path, chrom, snps, individuals=67, version="0.98.5 (2021-08-25)",
           maf="0.1", complete=True):
    assoc, log = tmp_path / f"assoc.{chrom}.txt", tmp_path / f"log.{chrom}.txt"
    rows = [f"{c}\t{rs}\t{ps}\t0\tX\tY\t0.3\t0.1\t0.1\t1e-05\t{p}" for c, rs, ps, p in snps]
    assoc.write_text("\n".join([HEADER, *rows]) + "\n")
    log.write_text("\n".join([
        "##", f"## GEMMA Version    = {version}",
        f"## Command Line Input = gemma -g g -p p -a a -k k -lmm 9 -maf {maf} -o lmm ",
        "## number of total individuals = 198",
        f"## number of analyzed individuals = {individuals}",
        f"## number of analyzed SNPs/var = {len(snps)}",
        "## total computation time = 0.01 min" if complete else "## Computation Time:",
    ]) + "\n")
    return Piece(chrom, assoc, log)


def test_agreeing_pieces_merge_in_genome_order_with_top_hits(tmp_path):
    pieces = [_piece(tmp_path, "X", [("X", "rsx", 5, 0.5)]),
              _piece(tmp_path, "10", [("10", "rs10", 7, 0.01)]),
              _piece(tmp_path, "2", [("2", "rs2b", 9, 0.2), ("2", "rs2a", 3, 0.001)])]
    summary = merge(pieces, tmp_path / "merged.txt")
    lines = (tmp_path / "merged.txt").read_text().splitlines()
    assert lines[0] == HEADER
    assert [ln.split("\t")[1] for ln in lines[1:]] == ["rs2a", "rs2b", "rs10", "rsx"]
    assert summary["snps"] == 4 and summary["chromosomes"] == ["2", "10", "X"]
    assert summary["top_hits"][0]["rs"] == "rs2a"
    assert summary["top_hits"][0]["minus_log10_p"] == pytest.approx(3.0)


@pytest.mark.parametrize("field,change", [
    ("individuals", {"individuals": 66}),
    ("version", {"version": "0.98.1"}),
    ("options", {"maf": "0.05"}),
])
def test_a_piece_that_disagrees_fails_the_gather_naming_piece_and_field(tmp_path, field,
                                                                        change):
    pieces = [_piece(tmp_path, "1", [("1", "a", 1, 0.5)]),
              _piece(tmp_path, "2", [("2", "b", 1, 0.5)], **change)]
    with pytest.raises(GatherError) as e:
        merge(pieces, tmp_path / "m.txt")
    assert "piece 'lmm chr 2'" in str(e.value) and f"field '{field}'" in str(e.value)
    assert not (tmp_path / "m.txt").exists()


def test_a_snp_in_two_pieces_is_refused(tmp_path):
    pieces = [_piece(tmp_path, "1", [("1", "dup", 1, 0.5)]),
              _piece(tmp_path, "2", [("2", "dup", 1, 0.5)])]
    with pytest.raises(GatherError, match="SNP dup appears twice"):
        merge(pieces, tmp_path / "m.txt")


def test_a_snp_on_the_wrong_chromosome_is_refused(tmp_path):
    pieces = [_piece(tmp_path, "1", [("1", "a", 1, 0.5)]),
              _piece(tmp_path, "2", [("3", "b", 1, 0.5)])]
    with pytest.raises(GatherError, match="piece 'lmm chr 2': line 2 has SNP b on chromosome 3"):
        merge(pieces, tmp_path / "m.txt")


def test_an_incomplete_gemma_log_is_refused(tmp_path):
    pieces = [_piece(tmp_path, "1", [("1", "a", 1, 0.5)]),
              _piece(tmp_path, "2", [("2", "b", 1, 0.5)], complete=False)]
    with pytest.raises(GatherError, match="piece 'lmm chr 2'.*incomplete"):
        merge(pieces, tmp_path / "m.txt")


def test_a_chromosome_given_twice_is_refused(tmp_path):
    pieces = [_piece(tmp_path, "1", [("1", "a", 1, 0.5)]),
              _piece(tmp_path, "1", [("1", "b", 2, 0.5)])]
    with pytest.raises(GatherError, match="more than one piece"):
        merge(pieces, tmp_path / "m.txt")


def test_the_manhattan_plot_puts_every_snp_in_genome_order_and_the_top_hit_highest(tmp_path):
    from PIL import Image

    from sheepdog.gemma.scan import plot

    rows = [("X", "rsx", 5e6, 0.5), ("10", "rs10", 1e6, 1e-6), ("2", "rs2a", 1e6, 0.01),
            ("2", "rs2b", 9e6, 0.2), ("1", "rs1", 3e6, 0.0)]
    assoc = tmp_path / "assoc.txt"
    assoc.write_text("\n".join([HEADER, *(f"{c}\t{rs}\t{ps:.0f}\t0\tX\tY\t0.3\t0.1\t0.1\t1e-05"
                                          f"\t{p}" for c, rs, ps, p in rows)]) + "\n")
    lay = plot.layout(assoc, thresholds={"significant": 1e-4})
    assert len(lay.points) == len(rows)
    assert [label for _, label in lay.x_ticks] == ["1", "2", "10", "X"]
    assert [x for x, _ in lay.x_ticks] == sorted(x for x, _ in lay.x_ticks)
    # p = 0 (printed as 0 by GEMMA) is drawn at the top, not dropped
    assert min(lay.points, key=lambda pt: pt[1]) == lay.points[0]
    (line_y, name, _), = lay.lines
    highest_label = max(float(label) for _, label in lay.y_ticks)
    assert name == "significant" and lay.y_ticks[-1][0] < line_y < lay.y_ticks[0][0]
    assert highest_label >= 300  # the axis reaches the highest point
    paths = plot.manhattan(assoc, tmp_path / "m", thresholds={"significant": 1e-4})
    assert Image.open(paths[0]).size == (plot.WIDTH, plot.HEIGHT)
    text = paths[1].read_text()
    assert text.count("<circle") == len(rows) and ">significant<" in text


def test_the_legend_covers_no_threshold_line_and_every_chromosome_has_its_label(tmp_path):
    """A permutation plot's thresholds near the top of the axis stay visible (the legend
    is above the plot); chromosomes without points keep their place and label."""
    import re

    from sheepdog.gemma.scan import plot

    rows = [("1", "rs1", 3e6, 2e-4), ("2", "rs2", 1e6, 0.3)]
    assoc = tmp_path / "assoc.txt"
    assoc.write_text("\n".join([HEADER, *(f"{c}\t{rs}\t{ps:.0f}\t0\tX\tY\t0.3\t0.1\t0.1\t1e-05"
                                          f"\t{p}" for c, rs, ps, p in rows)]) + "\n")
    thresholds = {"significant": 1.9e-4, "suggestive": 2.1e-4}  # at the very top of the axis
    lay = plot.layout(assoc, thresholds=thresholds)
    text = plot.svg(lay)
    keys = [float(y) for y in re.findall(r'<line x1="[\d.]+" y1="([\d.]+)" x2="[\d.]+" '
                                         r'y2="\1" stroke="#[0-9a-f]+" stroke-dasharray="6 4"/>',
                                         text)]
    assert len(keys) == 2 and all(k + 6 < plot.TOP for k in keys)  # legend above the plot
    assert all(y >= plot.TOP for y, _, _ in lay.lines)
    spread = plot.layout_of({"4": ([5e6], [3.0])}, "map", "-log10 p",
                            extents={"1": 190e6, "4": 150e6, "X": 170e6, "19": 60e6})
    assert [label for _, label in spread.x_ticks] == ["1", "4", "19", "X"]
    assert max(float(label) for _, label in spread.y_ticks) < 5  # the axis fits the data


def test_the_one_piece_of_every_snp_merges_alone_in_genome_order(tmp_path):
    """Without LOCO one LMM piece holds every chromosome's SNPs (in the file's order):
    merged in genome order, its chromosomes counted; beside another piece it is refused."""
    whole = _piece(tmp_path, "", [("X", "rsx", 5, 0.5), ("2", "rs2", 9, 0.2),
                                  ("10", "rs10", 7, 0.001), ("2", "rs2a", 3, 0.3)])
    summary = merge([whole], tmp_path / "merged.txt")
    lines = (tmp_path / "merged.txt").read_text().splitlines()
    assert [ln.split("\t")[1] for ln in lines[1:]] == ["rs2a", "rs2", "rs10", "rsx"]
    assert summary["chromosomes"] == ["2", "10", "X"] and summary["snps"] == 4
    assert summary["top_hits"][0]["rs"] == "rs10"
    with pytest.raises(GatherError, match="piece 'lmm all SNPs' holds every chromosome"):
        merge([whole, _piece(tmp_path, "1", [("1", "a", 1, 0.5)])], tmp_path / "m.txt")
