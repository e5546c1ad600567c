"""The toy PIE-Bench writer (p2p_engine/toy/pie.py): PIE's schema, its five kinds of edit, and an edit-success
detector checked on the dataset's own renders of every source and target."""
import json

import numpy as np
from PIL import Image

from p2p_engine import pie
from p2p_engine.toy import pie as toy_pie


def _entry(p) -> pie.Entry:
    e = p.entry
    return pie.Entry("k", e["image_path"], pie.clean(e["original_prompt"]), pie.clean(e["editing_prompt"]),
                     e["editing_type_id"], tuple(e["blended_word"].split()) if e["blended_word"] else None, e["mask"])


def test_detector_on_the_dataset_renders():
    """On the dataset's render of each edit's target the detector sees the edit; on the unedited source it does
    not: every one of the default 60 entries."""
    pairs = toy_pie.make_pairs()
    assert len(pairs) == 60
    for p in pairs:
        e = _entry(p)
        assert toy_pie.edit_success(e, p.source, p.target) == 1.0, p.entry
        assert toy_pie.edit_success(e, p.source, p.source) == 0.0, p.entry


def test_writes_pie_format(tmp_path):
    out = toy_pie.write(tmp_path / "toy_pie", per_type=4)
    mapping = json.loads((out / "mapping_file.json").read_text())
    assert len(mapping) == 20 and (out / "toy_pie.json").is_file()
    kinds = {}
    for key, e in mapping.items():
        assert set(e) == {"image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id",
                          "blended_word", "mask"}
        kinds[e["editing_type_id"]] = kinds.get(e["editing_type_id"], 0) + 1
        with Image.open(out / "annotation_images" / e["image_path"]) as im:
            assert im.size == (64, 64)
        assert "[" in e["editing_prompt"] and "[" not in e["original_prompt"]
        if e["blended_word"]:
            src_word, tgt_word = e["blended_word"].split(" ")
            assert src_word in e["original_prompt"].split(" ") and tgt_word in pie.clean(e["editing_prompt"]).split(" ")
    assert kinds == {t: 4 for t in ("0", "1", "4", "6", "8")}
    entries = pie.read_mapping(out)
    modes = {pie.protocol_job(e, out)["controller"]["mode"] for e in entries}
    assert modes == {"replace", "refine"}  # two-tone backgrounds add words: the protocol's Refine
    # the source images are the pairs' sources, pixel for pixel (PNG)
    pairs = toy_pie.make_pairs(per_type=4)
    first = np.asarray(Image.open(out / "annotation_images" / pairs[0].entry["image_path"]).convert("RGB"))
    assert np.array_equal(first, pairs[0].source)
    assert [p.name for p in tmp_path.iterdir()] == ["toy_pie"]  # written whole, nothing left beside it
