"""`lmrc app` on the command line: bad arguments are reported before the model loads or a port is taken."""
from lmrc.cli import main


def test_app_reports_a_missing_video_and_a_tiny_size(tmp_path, capsys):
    assert main(["app", str(tmp_path / "missing.mp4"), "--port", "0"]) == 2
    assert "missing.mp4 not found" in capsys.readouterr().err
    assert main(["app", "--size", "8", "--port", "0"]) == 2
    assert "--size" in (err := capsys.readouterr().err) and ">= 16 pixels" in err and "got 8" in err


def test_app_is_listed_with_its_options(capsys):
    try:
        main(["app", "--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--host" in out and "--max-frames" in out
    # the inference options are `lmrc segment`'s (one declaration, lmrc.inference.config)
    assert all(option in out for option in ("--size", "--precision", "--mem-every", "--top-k", "--flip", "--device"))
