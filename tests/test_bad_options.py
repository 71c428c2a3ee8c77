"""Bad option values for every command: refused at parse time (or, for what depends on the
model or the images, right after they are read, before any work) with status 2, one
``error:`` line naming the option, no traceback, and every file unchanged."""
import pytest

from hostile import assert_refused, copy_files, make_files, snapshot, xnorcdl

INFER = ["infer", "--weights", "w.npz", "--images", "i.bin", "--backend", "reference"]
TRADEOFF = ["tradeoff", "--weights", "w.npz", "--images", "i.bin", "--calib", "i.bin",
            "--backend", "reference"]
COMPARE = ["compare", "--weights", "w.npz", "w2.npz", "--images", "i.bin", "--backend",
           "reference"]
EXPLORE = ["explore", "--weights-dir", "grid", "--images", "i.bin", "--rules", "stored",
           "--baseline", "", "--out", "res"]
CLOUD = ["cloud", "--weights", "d/cloud.npz"]
EDGE = ["edge", "--weights", "d/edge.npz", "--images", "i.bin", "--cloud", "http://127.0.0.1:9"]

#: (command line, the option the error must name)
ROWS = [
    (INFER + ["--batch-size", "0"], "--batch-size"),
    (INFER + ["--batch-size", "-1"], "--batch-size"),
    (INFER + ["--batch-size", "x"], "--batch-size"),
    (INFER + ["--batch-size", "1.5"], "--batch-size"),
    (INFER + ["--batch-size", "99999999999"], "--batch-size"),
    (INFER + ["--threads", "0"], "--threads"),
    (INFER + ["--limit", "0"], "--limit"),
    (INFER + ["--limit", "-3"], "--limit"),
    (INFER + ["--threshold", "nan"], "--threshold"),
    (INFER + ["--threshold", "inf"], "--threshold"),
    (INFER + ["--threshold", "-1"], "--threshold"),
    (INFER + ["--threshold", "0.5,x"], "--threshold"),
    (INFER + ["--threshold", "1,2"], "--threshold"),          # 2 values, the model has 1 exit
    (INFER + ["--json", ""], "--json"),
    (INFER + ["--energy", ""], "--energy"),
    (["infer", "--weights", "", "--images", "i.bin"], "--weights"),
    (["infer", "--weights", "w.npz", "--images", ""], "--images"),
    (INFER + ["--backend", "gpu"], "--backend"),
    (INFER + ["--format", "cifar11"], "--format"),
    (INFER + ["--no-such-option"], "--no-such-option"),
    (TRADEOFF + ["--calib-range", "x"], "--calib-range"),
    (TRADEOFF + ["--calib-range", "5:1"], "--calib-range"),
    (TRADEOFF + ["--calib-range", "0:99"], "--calib-range"),   # the set holds 20 records
    (TRADEOFF + ["--rules", "bogus:1"], "--rules"),
    (TRADEOFF + ["--rules", ","], "--rules"),
    (TRADEOFF + ["--write", ""], "--write"),
    (TRADEOFF + ["--calib", ""], "--calib"),
    (COMPARE + ["--range", "1:2:3"], "--range"),
    (COMPARE + ["--calib-range", "0:5"], "--calib-range"),    # needs --calib FILE
    (COMPARE + ["--rules", "exits:101"], "--rules"),
    (EXPLORE + ["--calib-limit", "0"], "--calib-limit"),
    (EXPLORE + ["--limit", "0"], "--limit"),
    (EXPLORE + ["--rules", "stored,within:x"], "--rules"),
    (["explore", "--weights-dir", "", "--images", "i.bin", "--out", "res"], "--weights-dir"),
    (["explore", "--weights-dir", "grid", "--images", "i.bin", "--out", ""], "--out"),
    (CLOUD + ["--port", "70000"], "--port"),
    (CLOUD + ["--port", "-1"], "--port"),
    (CLOUD + ["--max-wait-ms", "nan"], "--max-wait-ms"),
    (CLOUD + ["--max-wait-ms", "2000"], "--max-wait-ms"),
    (CLOUD + ["--max-request-mb", "0"], "--max-request-mb"),
    (CLOUD + ["--max-request-mb", "inf"], "--max-request-mb"),
    (CLOUD + ["--queue", "0"], "--queue"),
    (CLOUD + ["--max-batch", "0"], "--max-batch"),
    (CLOUD + ["--replicas", "0"], "--replicas"),
    (CLOUD + ["--threads", "0"], "--threads"),
    (CLOUD + ["--host", ""], "--host"),
    (CLOUD + ["--token-file", ""], "--token-file"),
    (EDGE + ["--concurrency", "0"], "--concurrency"),
    (EDGE + ["--batch-size", "0"], "--batch-size"),
    (EDGE + ["--batch-size", "100000"], "--batch-size"),     # more than a wire message holds
    (EDGE + ["--edge-batch", "0"], "--edge-batch"),
    (EDGE + ["--retry-for", "-1"], "--retry-for"),
    (EDGE + ["--retry-for", "nan"], "--retry-for"),
    (EDGE + ["--timeout", "0"], "--timeout"),
    (EDGE + ["--tx-pj-per-bit", "inf"], "--tx-pj-per-bit"),
    (EDGE + ["--tx-pj-per-bit", "-1"], "--tx-pj-per-bit"),
    (EDGE + ["--limit", "0"], "--limit"),
    (EDGE + ["--threshold", "0.5,0.5"], "--threshold"),
    (["edge", "--weights", "d/edge.npz", "--images", "i.bin", "--cloud", "ftp://h"], "--cloud"),
    (["edge", "--weights", "d/edge.npz", "--images", "i.bin", "--cloud", "http://"], "--cloud"),
    (["edge", "--weights", "d/edge.npz", "--images", "i.bin", "--cloud", "http://h:99999"],
     "--cloud"),
    (["data", "cifar100"], "dataset"),
    (["data", "cifar10", "--dest", ""], "--dest"),
    (["data", "cifar10", "--from", ""], "--from"),
    (["summary", "--weights", "w.npz", "--json", ""], "--json"),
    (["split", "--weights", "w.npz", "--out", ""], "--out"),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("pristine"))


@pytest.mark.parametrize("argv, option", ROWS, ids=[" ".join(r[0][:1] + r[0][-2:])
                                                    for r in ROWS])
def test_bad_option(pristine, tmp_path, argv, option):
    copy_files(pristine, tmp_path)
    before = snapshot(tmp_path)
    r = xnorcdl(argv, tmp_path)
    assert_refused(r, option)
    assert snapshot(tmp_path) == before


def test_unknown_command_is_a_usage_error(tmp_path):
    r = xnorcdl(["nope"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_option_types_in_process():
    """The same checks as a caller of cli.main sees them: status 2, no SystemExit raised."""
    from xnorcdl import cli
    assert cli.main(["infer", "--weights", "w.npz", "--images", "i.bin", "--batch-size", "0"]) \
        == 2
    assert cli.integer(0, 10)("7") == 7 and cli.number(0, 1)("0.5") == 0.5
    import argparse
    for bad in ("nan", "inf", "-0.1", "1.1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.number(0, 1)(bad)
