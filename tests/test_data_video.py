"""Video rows as frame images: uniform frame sampling, folders of frames, and one training step."""

import numpy as np
import pytest
from PIL import Image

from vispo.data.sample import DataError, SampleDataset
from vispo.data.video import frame_indices, video_frames, video_sample
from vispo.rewards import RewardRunner
from vispo.train.trainer import Trainer


def test_frame_indices_by_hand():
    assert frame_indices(10, 4) == [0, 3, 6, 9]  # 0, 3, 6, 9 exactly
    assert frame_indices(9, 3) == [0, 4, 8]
    assert frame_indices(8, 3) == [0, 4, 7]  # 3.5 rounds up
    assert frame_indices(3, 8) == [0, 1, 2]
    assert frame_indices(5, 1) == [0]
    with pytest.raises(DataError):
        frame_indices(0, 2)


def test_folder_of_frames_and_sample(tmp_path):
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"f{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = video_frames(tmp_path)
    assert [f.rsplit("/", 1)[-1] for f in frames] == [f"f{i:02d}.png" for i in range(6)]
    s = video_sample("v0", tmp_path, "What changes?", "brightness", num_frames=3)
    assert s.meta == {"video_frames": [0, 3, 5], "video_length": 6}
    assert [int(np.asarray(im)[0, 0, 0]) for im in s.load_images()] == [0, 120, 200]
    with pytest.raises(DataError, match="folder of frame images"):
        video_frames(tmp_path / "clip.mp4")


def parity_reward(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


def test_a_video_row_trains_with_papo(tmp_path, sample_images, one_step_config):
    rows = [
        video_sample(
            f"v{i}", [sample_images[(i + k) % 4] for k in range(6)], "Moving?", "no", num_frames=3
        )
        for i in range(4)
    ]
    cfg = one_step_config(tmp_path, "papo_g")
    trainer = Trainer(
        cfg, train_data=SampleDataset(rows), reward_fn=RewardRunner(parity_reward, num_workers=0)
    )
    history = trainer.train()
    assert np.isfinite(history[0]["loss/total"])
    step = trainer._last_step
    assert [len(g.images) for g in step.groups] == [3, 3]
    assert [len(v) for v in step.variant_images["mask"]] == [3, 3]  # each frame masked
