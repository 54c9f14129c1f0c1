"""app.py in a real browser: headless Chromium (the Debian package) driven by Playwright.

The page is served on a free localhost port; the test uploads a demo slice, a corrupt file and a
small NIfTI volume, reads the score, calibrated probability and decision from the page and checks
them against test_one_example.py's own for the same file. Not skipped when the browser is missing: .ci/run installs it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import nibabel
import numpy as np
import pytest

import app
import test_one_example
from generate_dataset.demo import build_demo
from tests.helpers import CHROMIUM, free_port, save_calibrated
from utils import InputError

SCREENSHOTS = os.environ.get("MEDVMAD_SCREENSHOTS")  # keep the screenshots here when set


def ground_truth(demo_root: str, name: str) -> str:
    """"lesion" when the demo test image ``name`` has a lesion in its mask file, else "normal"."""
    mask = Path(demo_root, "test", "Ungood", "anomaly_mask", name)
    return "lesion" if mask.is_file() and cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE).any() else "normal"


def test_demo_images_are_captioned_with_their_ground_truth(tmp_path):
    """Normal and lesion images alternate, each captioned by what its mask file says."""
    demo_root = build_demo(str(tmp_path / "demo"), n_train=1, n_valid=(1, 1), n_test=(3, 2), image_size=64)
    choices = app.demo_images(demo_root)
    assert len(choices) == 4  # pairs of one normal and one lesion image
    for caption, path in choices:
        assert caption == f"{ground_truth(demo_root, Path(path).name)}: {Path(path).name}" and os.path.isfile(path)
    assert [caption.split(":")[0] for caption, _ in choices] == ["normal", "lesion", "normal", "lesion"]


def test_a_bad_page_flag_is_one_line_error():
    with pytest.raises(InputError, match="argument --port: invalid int value: 'x'"):
        app.parse_args(["--port", "x"])


def test_the_page_scores_at_most_a_quarter_of_the_cli_voxel_cap():
    """A page shared by several users defaults to 2**26 voxels (the CLI to 2**28); --max_voxels sets it."""
    assert app.parse_args([])[1].max_voxels == 2**26
    assert app.parse_args(["--max_voxels", "1000"])[1].max_voxels == 1000


def test_no_checkpoint_page_says_how_to_get_one(tmp_path):
    scorer, message = app.load_scorer(app.parse_args(["--checkpoint_path", str(tmp_path / "none.pth")])[1])
    assert scorer is None and "not found" in message and "bash train.sh indomain" in message


def test_the_server_names_its_address_and_never_hints_at_a_share_link(tmp_path, capfd, caplog, monkeypatch):
    """README: no share link. gradio's own "To create a public link, set share=True" is not printed;
    the page's address is logged instead."""
    import gradio

    monkeypatch.setattr(gradio.Blocks, "block_thread", lambda self: self.close())  # serve, then stop at once
    port = free_port()
    caplog.set_level(logging.INFO, logger="medvmad.app")
    app.main(["--port", str(port), "--checkpoint_path", str(tmp_path / "none.pth"), "--demo_path", str(tmp_path)])
    printed = capfd.readouterr()
    assert "public link" not in printed.out + printed.err and "share=True" not in printed.out + printed.err
    assert any(f"serving on http://127.0.0.1:{port}/" in record.getMessage() for record in caplog.records)


def test_scores_in_the_page_equal_test_one_example(tmp_path, caplog, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM and os.path.isfile(CHROMIUM), "no chromium: apt-get install -y chromium (.ci/run does)"
    checkpoint = tmp_path / "tiny.pth"
    save_calibrated(checkpoint)
    demo_root = build_demo(str(tmp_path / "demo"), n_train=1, n_valid=(1, 1), n_test=(2, 2), image_size=64)
    demo_slice = app.demo_images(demo_root)[1][1]                    # an anomalous test image
    rng = np.random.default_rng(0)
    volume = tmp_path / "small.nii.gz"
    nibabel.save(nibabel.Nifti1Image(rng.uniform(0, 500, (40, 48, 5)).astype(np.float32), np.diag([1, 1, 2, 1.])),
                 str(volume))
    (tmp_path / "corrupt.nii.gz").write_bytes(b"this is not a volume")

    expected = {path: test_one_example.main(["--image_path", str(path), "--checkpoint_path", str(checkpoint),
                                             "--save_path", str(tmp_path / "cli"), "--device", "cpu"])[0]
                for path in (demo_slice, volume)}

    own, scoring = app.parse_args(["--checkpoint_path", str(checkpoint), "--device", "cpu",
                                   "--demo_path", demo_root])
    scorer, message = app.load_scorer(scoring)
    assert message is None
    scored = []
    real_call = app.Scorer.__call__
    monkeypatch.setattr(app.Scorer, "__call__", lambda self, path: scored.append(path) or real_call(self, path))
    page_app = app.build_app(scorer, app.demo_images(demo_root))
    port = free_port()
    page_app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    footer_links=[], allowed_paths=[demo_root])
    caplog.set_level(logging.INFO, logger="medvmad.app")
    logging.getLogger("medvmad.app").addHandler(caplog.handler)  # seen even if "medvmad" stops propagating
    shots = Path(SCREENSHOTS or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1600})

            def upload(path) -> str:
                page.goto(f"http://127.0.0.1:{port}/")
                page.locator("#upload input[type=file]").set_input_files(str(path))
                box = page.locator("#score textarea, #score input").first
                expect(box).not_to_have_value("", timeout=30_000)
                return box.input_value()

            score = upload(demo_slice)
            assert float(score) == pytest.approx(expected[demo_slice]["score"], abs=1e-6)
            decision = page.locator("#decision textarea, #decision input").first.input_value()
            assert decision.startswith(f"{expected[demo_slice]['decision']} at F1-max on validation images")
            probability = page.locator("#probability textarea, #probability input").first.input_value()
            assert probability == f"{expected[demo_slice]['probability']:.3f} (platt, fitted on 60 validation " \
                                  "images (30 abnormal))"
            page.screenshot(path=str(shots / "app_slice.png"), full_page=True)

            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#upload input[type=file]").set_input_files(str(tmp_path / "corrupt.nii.gz"))
            expect(page.locator("#status")).to_contain_text("Could not score this file", timeout=30_000)
            expect(page.locator("#status")).to_contain_text("corrupt.nii.gz: unreadable NIfTI")

            score = upload(volume)                                     # the server kept running
            assert float(score) == pytest.approx(expected[volume]["score"], abs=1e-6)
            expect(page.locator("#slice")).to_be_visible()
            decision = page.locator("#decision textarea, #decision input").first.input_value()
            assert decision.startswith(f"{expected[volume]['decision']} at F1-max on validation patients")
            probability = page.locator("#probability textarea, #probability input").first.input_value()
            assert probability.startswith(f"{expected[volume]['probability']:.3f} (platt, fitted on 20 validation "
                                          "patients")
            best = expected[volume]["most_anomalous_slice"]
            expect(page.locator("#slice input[type=number]")).to_have_value(str(best))
            page.screenshot(path=str(shots / "app_volume.png"), full_page=True)

            page.goto(f"http://127.0.0.1:{port}/")                    # a demo image, listed with its truth
            page.locator("#demo input").click()
            options = page.get_by_role("option")
            expect(options).to_have_count(4)
            captions = [option.inner_text().strip() for option in options.all()]
            assert captions == [f"{ground_truth(demo_root, name)}: {name}"
                                for name in (caption.split(": ")[-1] for caption in captions)]
            assert sorted(c.split(":")[0] for c in captions) == ["lesion", "lesion", "normal", "normal"]
            scored.clear()
            options.filter(has_text=Path(demo_slice).name).click()
            box = page.locator("#score textarea, #score input").first
            expect(box).not_to_have_value("", timeout=30_000)
            assert float(box.input_value()) == pytest.approx(expected[demo_slice]["score"], abs=1e-6)
            page.wait_for_timeout(2_000)                                 # a second scoring would have started
            assert scored == [demo_slice]                                # scored once
            page.locator("#overlay").hover()
            expect(page.locator("#overlay button[aria-label='Download']")).to_have_count(1)
            expect(page.locator("#overlay button[aria-label='Share']")).to_have_count(0)  # no share button
            browser.close()
    finally:
        page_app.close()
        logging.getLogger("medvmad.app").removeHandler(caplog.handler)
    records = {id(r): r for r in caplog.records if r.name == "medvmad.app"}.values()  # each once
    failures = [r.getMessage() for r in records if "could not score" in r.getMessage()]
    assert len(failures) == 1 and "corrupt.nii.gz" in failures[0] and "\n" not in failures[0]
    assert (shots / "app_volume.png").stat().st_size > 10_000
