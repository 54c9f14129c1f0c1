"""A local web demo: drop a scan into the page, see where MedVMAD finds an anomaly.

    python app.py --checkpoint_path checkpoint/indomain/Brain/best.pth      # http://127.0.0.1:7860

Upload a PNG/JPG, a DICOM file, a NIfTI/NRRD/MetaImage volume or a zipped DICOM series, or pick an
image of the demo set. The page shows the overlay, the score, its calibrated probability (or
"uncalibrated") and the decision at the checkpoint's operating point; a volume also gets a slice
slider, the per-slice score plot and its most anomalous slices. The map (PNG, or a volume on the
input's grid) and the mask can be downloaded.
Reading, scoring and the output files are test_one_example.py's own (``read_one``,
``score_slices``, ``report``), so the page shows the score the command line gives. Every
test_one_example.py flag (--window, --axis, --threshold, --volume_format, --device ...) applies.
Runs offline: no analytics, no share link, served on localhost only by default.

Limits (the README lists them): an upload of at most MAX_UPLOAD; inputs over --max_voxels refused
from their header; headers that name a separate data file (.mhd, .nhdr) refused, so an upload can
never make the server read another file; images drawn at most DISPLAY_SIDE pixels a side; each
upload's output folder removed once its result has been sent.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

import test_one_example
from evaluation.calibration import Decision
from utils import ArgumentParser, InputError, one_line, positive_int, resolve_device, run_cli
from visualization import fit_within, overlay_panel

DEFAULT_CHECKPOINT = "checkpoint/indomain/Brain/best.pth"
DEFAULT_DEMO = "data/demo/Brain"
HOW_TO_GET_ONE = ("**No checkpoint loaded.** Train the demo one with `bash train.sh indomain` (minutes on a CPU: "
                  "the README's Quick start gives the times measured; it writes `checkpoint/indomain/Brain/best.pth`), "
                  "then start the page again with "
                  "`python app.py --checkpoint_path checkpoint/indomain/Brain/best.pth`.")
MAX_UPLOAD = "1gb"  # gradio refuses larger uploads in the page
PAGE_MAX_VOXELS = 2**26  # 64 Mi voxels (256 x 256 x 1024): a shared page holds less than one CLI run may
NO_SHARE = ["download", "fullscreen"]  # image buttons: gradio's default adds "share" (to Hugging Face)
DISPLAY_SIDE = 1024  # slices are drawn at most this many pixels a side (WebP stops at 16383)
CACHE_CLEANING = (600, 3600)  # every 10 minutes, gradio deletes its cached uploads and results older than an hour
logger = logging.getLogger("medvmad.app")


DEMO_CLASSES = (("good", "normal"), ("Ungood", "lesion"))  # test/<folder>/img and the ground truth it means


def demo_images(root: str, count: int = 12) -> list[tuple[str, str]]:
    """Up to ``count`` test images of the demo set, normal and anomalous alternating, as
    (caption with the ground truth, path): ("lesion: 000_112.png", ".../test/Ungood/img/000_112.png")."""
    classes = [[(f"{truth}: {path.name}", str(path))
                for path in sorted(Path(root, "test", folder, "img").glob("*.png"))]
               for folder, truth in DEMO_CLASSES]
    return [choice for pair in zip(*classes) for choice in pair][:count]


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def score_plot(indices: list[int], scores: np.ndarray, threshold: float, current: int | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 2.6), dpi=100)
    axis.plot(indices, scores, marker="o", markersize=2)
    axis.axhline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    if current is not None:
        axis.axvline(current, color="gray", linewidth=1)
    axis.set(xlabel="slice", ylabel="score", ylim=(0, 1))
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    plt.close(figure)
    return figure


class Scorer:
    """Scores one file the way test_one_example.py does and keeps what the page needs.

    Uploads are read as single files (a header naming another file is refused) of at most
    ``--max_voxels``; each one's output files go to a folder of their own under ``workspace``
    (removed with the app), which ``release`` removes once the page has been sent the result."""

    def __init__(self, model, decision: Decision, source: str, args: argparse.Namespace, device):
        self.model, self.decision, self.source, self.args, self.device = model, decision, source, args, device
        self.threshold = decision.threshold  # of an image, a volume's slices
        self.workspace = tempfile.TemporaryDirectory(prefix="medvmad_app_")

    def __call__(self, path: str) -> dict:
        args = self.args
        scan = test_one_example.read_one(path, args, single_file=True)
        scores, maps = test_one_example.score_slices(self.model, scan.slices, self.device, args.precision,
                                                     args.batch_size, path)
        out = Path(tempfile.mkdtemp(dir=self.workspace.name))
        try:
            record = test_one_example.report(scan, scores, maps, self.decision, self.source, out, args.top_k,
                                             args.volume_format)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        stem = test_one_example.output_stem(scan.path)
        record["folder"] = str(out)
        record["downloads"] = [p for p in (str(out / f"{stem}.png"), record.get("map_png"), record.get("mask_png"),
                                           record.get("map_volume"), record.get("mask_volume")) if p]
        record["overlay"] = str(out / f"{stem}.png")
        record["view"] = {"images": [fit_within(to_uint8(s), DISPLAY_SIDE) for s in scan.slices],
                          "maps": [fit_within(m, DISPLAY_SIDE) for m in maps], "scores": scores,
                          "indices": scan.slice_indices}
        return record

    @staticmethod
    def release(record: dict) -> None:
        """Remove a result's output folder (the page has its own copies of what it sent)."""
        shutil.rmtree(record["folder"], ignore_errors=True)


def slice_panel(view: dict, threshold: float, index: int | None) -> np.ndarray:
    position = 0 if view["indices"] is None else view["indices"].index(int(index))
    score = float(view["scores"][position])
    label = "" if view["indices"] is None else f"slice {view['indices'][position]} "
    text = f"{label}score {score:.3f} {'anomalous' if score >= threshold else 'normal'}"
    return overlay_panel(view["images"][position], view["maps"][position], 0.0, 1.0, text=text)


def failure_line(error: BaseException, path: str) -> str:
    """One line for the page and the log: an ``InputError``'s own message, anything else with its
    type; the upload's server folder left out."""
    text = one_line(str(error)) if str(error).strip() else ""
    if not isinstance(error, InputError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text.replace(os.path.dirname(path) + os.sep, "")


def build_app(scorer: Scorer | None, demo: list[tuple[str, str]] = (), message: str | None = None):
    """The Gradio page. ``scorer`` None: the page explains how to get a checkpoint."""
    import gradio as gr

    with gr.Blocks(title="MedVMAD", delete_cache=CACHE_CLEANING) as page:
        gr.Markdown("# MedVMAD: anomaly maps for medical scans\nUpload a PNG/JPG, DICOM, NIfTI/NRRD/MetaImage "
                    "volume or a zipped DICOM series, or pick a demo image (listed with its ground truth).")
        status = gr.Markdown(message or ("" if scorer else HOW_TO_GET_ONE), elem_id="status")
        with gr.Row():
            upload = gr.File(label="scan", file_count="single", type="filepath", elem_id="upload")
            chooser = gr.Dropdown(choices=list(demo), value=None, label="demo image (ground truth: file)",
                                  elem_id="demo", interactive=bool(demo))
        with gr.Row():
            score = gr.Textbox(label="score", interactive=False, elem_id="score")
            probability = gr.Textbox(label="calibrated probability of abnormal", interactive=False,
                                     elem_id="probability")
            decision = gr.Textbox(label="decision", interactive=False, elem_id="decision")
        overlay = gr.Image(label="overlay", type="numpy", interactive=False, elem_id="overlay", height=400,
                           buttons=NO_SHARE)
        slider = gr.Slider(label="slice", minimum=0, maximum=1, step=1, value=0, visible=False, elem_id="slice")
        plot = gr.Plot(label="score per slice", visible=False)
        montage = gr.Image(label="most anomalous slices", type="filepath", interactive=False, visible=False,
                           buttons=NO_SHARE)
        files = gr.File(label="downloads: overlay, map, mask", file_count="multiple", interactive=False,
                        elem_id="downloads")
        state = gr.State(None)

        def run(path: str | None) -> Iterator[tuple]:
            """The page's outputs for one upload; its output folder is removed once gradio has sent
            them (and copied the files into its own cache), when the generator resumes or is closed."""
            empty = ("", "", "", None, gr.Slider(visible=False), gr.Plot(visible=False), gr.Image(visible=False),
                     None, None)
            if not path:
                yield (gr.Markdown(),) + empty
                return
            if scorer is None:
                yield (gr.Markdown(HOW_TO_GET_ONE),) + empty
                return
            record = None
            try:
                record = scorer(path)
                outputs = page_outputs(record)
            except Exception as error:  # noqa: BLE001 - any bad upload: one line in the page and the log
                if record is not None:
                    scorer.release(record)
                line = failure_line(error, path)
                logger.warning("could not score %s: %s", os.path.basename(path), line)
                yield (gr.Markdown(f"**Could not score this file.** {line}"),) + empty
                return
            logger.info("scored %s: score %.6f %s", os.path.basename(path), record["score"], record["decision"])
            try:
                yield outputs
            finally:
                scorer.release(record)

        def page_outputs(record: dict) -> tuple:
            view, threshold = record["view"], record.get("slice_threshold", record["threshold"])
            note = " ".join(f"Warning: {w.replace(os.path.dirname(record['path']) + os.sep, '')}"
                            for w in record.get("warnings", []))
            verdict = (f"{record['decision']} at {record['operating_point']} (score >= {record['threshold']:.3f}, "
                       f"{record['threshold_from']})")
            shown = ("uncalibrated" if record["probability"] is None else
                     f"{record['probability']:.3f} ({record['calibration']})")
            if view["indices"] is None:
                return (gr.Markdown(note), f"{record['score']:.6f}", shown, verdict,
                        slice_panel(view, threshold, None),
                        gr.Slider(visible=False), gr.Plot(visible=False), gr.Image(visible=False),
                        record["downloads"], view)
            best = record["most_anomalous_slice"]
            return (gr.Markdown(note), f"{record['score']:.6f}", shown + " for the volume",
                    verdict + f", most anomalous slice {best}",
                    slice_panel(view, threshold, best),
                    gr.Slider(minimum=view["indices"][0], maximum=view["indices"][-1], value=best, step=1,
                              visible=True),
                    gr.Plot(score_plot(view["indices"], view["scores"], threshold, best), visible=True),
                    gr.Image(record["overlay"], visible=True), record["downloads"], view)

        def show_slice(view, index):
            if not view or view["indices"] is None:
                return gr.Markdown(), gr.Image(), gr.Plot()
            threshold = scorer.threshold
            try:
                return (gr.Markdown(), slice_panel(view, threshold, index),
                        gr.Plot(score_plot(view["indices"], view["scores"], threshold, int(index))))
            except Exception as error:  # noqa: BLE001 - one line in the page, never a bare "Error"
                logger.warning("could not show slice %s: %s", index, one_line(str(error)))
                return gr.Markdown(f"**Could not show slice {index}.** {one_line(str(error))}"), gr.Image(), gr.Plot()

        outputs = [status, score, probability, decision, overlay, slider, plot, montage, files, state]
        upload.upload(run, inputs=upload, outputs=outputs)
        chooser.select(run, inputs=chooser, outputs=outputs)  # once per pick (.input fires twice in gradio 6)
        slider.release(show_slice, inputs=[state, slider], outputs=[status, overlay, plot])
    return page


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """The page's own flags, then test_one_example.py's flags for everything about scoring."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="Any test_one_example.py flag is also accepted.")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--demo_path", default=DEFAULT_DEMO, help="dataset root whose test images are offered")
    parser.add_argument("--max_voxels", type=positive_int, default=PAGE_MAX_VOXELS,
                        help=f"largest upload the page scores, in voxels (default {PAGE_MAX_VOXELS:,}, a quarter "
                             "of test_one_example.py's: several users share the server's memory)")
    own, rest = parser.parse_known_args(argv)
    if not 1 <= own.port <= 65535:
        parser.error(f"argument --port: must be a port number in 1..65535, got {own.port}")
    scoring = test_one_example.parse_args(["--image_path", "(uploads)", "--max_voxels", str(own.max_voxels), *rest])
    if scoring.checkpoint_path is None and os.path.isfile(DEFAULT_CHECKPOINT):
        scoring.checkpoint_path = DEFAULT_CHECKPOINT
    return own, scoring


def check_address(host: str, port: int) -> None:
    """Refuse, before anything is loaded, a --host that does not resolve or is not this machine's,
    and a --port that is taken or not ours to use: one line each, not the server's traceback."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise InputError(f"--host {host}: cannot be resolved ({error.strerror})") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise InputError(f"--port {port}: already in use on {host}; choose another --port") from None
            raise InputError(f"--host {host} --port {port}: cannot serve there ({error.strerror})") from None


def load_scorer(args: argparse.Namespace) -> tuple[Scorer | None, str | None]:
    """The scorer, or None and a message for the page when there is no usable checkpoint."""
    if not args.checkpoint_path:
        return None, None
    if not os.path.isfile(args.checkpoint_path):
        return None, f"**Checkpoint `{args.checkpoint_path}` not found.** " + HOW_TO_GET_ONE
    device = resolve_device(args.device)
    try:
        model, threshold, source = test_one_example.build(args, device)
    except InputError as error:
        return None, f"**Could not load the checkpoint:** {error}"
    return Scorer(model, threshold, source, args, device), None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    own, scoring = parse_args(argv)
    check_address(own.host, own.port)
    scorer, message = load_scorer(scoring)
    if message or scorer is None:
        logger.warning("no checkpoint loaded: the page says how to get one")
    page = build_app(scorer, demo_images(own.demo_path), message)
    try:
        page.launch(server_name=own.host, server_port=own.port, share=False, show_error=False, footer_links=[],
                    allowed_paths=[os.path.abspath(own.demo_path)], max_file_size=MAX_UPLOAD,
                    quiet=True, prevent_thread_lock=True)  # quiet: no "To create a public link" hint
    except OSError as error:  # the port was taken after check_address
        raise InputError(f"--host {own.host} --port {own.port}: cannot serve there ({one_line(str(error))})") from None
    logger.info("serving on %s (this machine only unless --host says otherwise; no share link); Ctrl+C stops it",
                page.local_url)
    page.block_thread()


if __name__ == "__main__":
    run_cli(main)
