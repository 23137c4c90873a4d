"""Open Hugging Face folders with plain transformers, as a user without this project would.

Run as `python -I tests/stock_check.py DIR...` (isolated: neither this folder nor PYTHONPATH is on sys.path), it
prints one JSON line per folder: the classes the Auto classes returned, whether every weight loaded, and what
stock `AutoProcessor` did. It never imports this project, and says so in its output.
"""

import json
import sys


def check(folder: str) -> dict:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )
    from transformers.models.auto.processing_auto import processor_class_from_name

    out: dict = {"folder": folder, "model_type": AutoConfig.from_pretrained(folder).model_type}
    model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    out["model"] = type(model).__name__
    out["loading"] = {k: sorted(v) for k, v in info.items() if k != "error_msgs"}
    with open(f"{folder}/processor_config.json") as f:
        name = json.load(f)["processor_class"]
    cls = processor_class_from_name(name)
    out["processor_class"] = name
    out["processor_class_module"] = getattr(cls, "__module__", None)
    out["tokenizer"] = type(AutoTokenizer.from_pretrained(folder)).__name__
    out["image_processor"] = type(AutoImageProcessor.from_pretrained(folder)).__name__
    try:
        proc = AutoProcessor.from_pretrained(folder)
        out["auto_processor"] = type(proc).__name__
        video = getattr(proc, "video_processor", None)
        out["video_processor"] = None if video is None else type(video).__name__
    except ImportError as e:  # stock behaviour without torchvision for families with a video processor
        out["auto_processor_error"] = str(e).strip().splitlines()[0]
    try:
        import torchvision  # noqa: F401

        out["torchvision"] = True
    except ImportError:
        out["torchvision"] = False
    project = ("modules", "app", "datamodules", "callbacks")
    out["project_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in project)
    return out


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(json.dumps(check(folder)), flush=True)
