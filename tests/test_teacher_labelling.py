"""Stage one's core without Ray: chunks, and views cut at the student's size for a larger teacher."""

from __future__ import annotations

import numpy as np
import torch

from conftest import smooth_rgb, write_teacher
from deitpipe.shards.format.image import cut_view, decode_image, upsample_views
from deitpipe.teacher import Preprocessing
from deitpipe.teacher.labelling import ViewTeacher, chunk_plan, decode_chunk


def _items(tmp_path, n=3):
    items = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        smooth_rgb(24 + 4 * i, 30).save(path)
        items.append({"index": i, "path": str(path), "label": i % 10, "kind": "file", "ref": str(path), "size": 0,
                      "data": None, "offset": 0, "length": 0})
    return items


def test_chunks_follow_shard_order_and_fill_one_teacher_pass():
    plan = [[4, 0, 2], [1, 3], [5]]
    assert chunk_plan(plan, [0, 1, 2], views=2, batch_size=6) == [[4, 0], [2, 1], [3, 5]]
    assert chunk_plan(plan, [1], views=8, batch_size=4) == [[1], [3]]  # at least one image a chunk


def test_views_cut_at_the_students_size_are_what_the_teacher_sees_larger(tmp_path):
    prep = Preprocessing(resize=32, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")
    items = _items(tmp_path)
    out = decode_chunk(items, seed=0, views=4, prep=prep.to_dict(), min_scale=0.3, view_size=16)
    assert out["pixels"].shape == (3, 5, 3, 32, 32) and out["ok"].all()
    for i, item in enumerate(items):
        img = decode_image(open(item["ref"], "rb").read())
        for v in range(5):
            # The student replays the stored box at 16 px with the same cut; the teacher saw that, upsampled.
            student = cut_view(img, tuple(int(x) for x in out["box"][i, v]), bool(out["flip"][i, v]), 16)
            assert torch.equal(upsample_views(student[None], 32)[0], torch.from_numpy(out["pixels"][i, v]))
    plain = decode_chunk(items, seed=0, views=4, prep=prep.to_dict(), min_scale=0.3)
    assert np.array_equal(plain["box"], out["box"])  # the same boxes, cut at another size
    assert not np.array_equal(plain["pixels"], out["pixels"])


def test_the_stored_label_is_the_teachers_answer_on_the_upsampled_student_view(tmp_path):
    weights = write_teacher(tmp_path / "t.pt", side=32)
    prep = Preprocessing(resize=32, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")
    teacher = ViewTeacher(name="resnet18", weights_path=str(weights), topk=3, device="cpu", batch_size=64)
    out = teacher(decode_chunk(_items(tmp_path), seed=1, views=3, prep=prep.to_dict(), view_size=16))
    items = _items(tmp_path)
    for i, item in enumerate(items):
        img = decode_image(open(item["ref"], "rb").read())
        views = torch.stack([cut_view(img, tuple(int(x) for x in out["box"][i, v]), bool(out["flip"][i, v]), 16)
                             for v in range(4)])
        live = teacher.predictor({"pixels": upsample_views(views, 32).numpy()})
        assert np.array_equal(live["hard"], out["hard"][i])


def test_upsample_is_identity_at_the_same_size():
    views = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert upsample_views(views, 8) is views
    assert upsample_views(views, 16).dtype == torch.uint8 and upsample_views(views, 16).shape[-1] == 16

