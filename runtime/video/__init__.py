"""Video input: any file FFmpeg reads (PyAV), a folder of frames, or a YouTube-VIS dataset json.

Every source yields :class:`Frame` objects — ``index`` (0, 1, 2, ... in the order the decoder
delivers them), ``pts_seconds`` (presentation time in seconds, kept as stored so variable frame
rate survives) and ``rgb`` (uint8 (H, W, 3), C-contiguous, upright).

- :func:`open_source` ``(path) -> VideoSource``: a video file (H.264/H.265/VP9/AV1/MPEG-4/... in
  MP4/MOV/MKV/WebM/AVI/...), a folder of frames (YouTube-VIS ``JPEGImages/<video>/`` layout) or a
  single image.
- :func:`load_ytvis_videos` ``(json, root) -> list[YtvisVideo]``: the videos of a YouTube-VIS /
  OVIS dataset json, each openable as a frame-folder source.
- :func:`prefetch` ``(source, max_queue) -> Prefetcher``: decode in a background thread into a
  bounded queue; decode errors are re-raised in the consumer.

Video files: the rotation a phone stores as display-matrix side data (or as a legacy ``rotate``
tag) is applied, flips included, so a clip stored 1920x1080 with a 90-degree rotation comes out
1080x1920. Every pixel format FFmpeg knows (yuv420p/422p/444p, full-range yuvj*, gray, rgb24,
10/12-bit, ...) is converted to 8-bit RGB by swscale, honouring the frame's colour matrix and
range tags (PyAV's ``VideoFrame.to_ndarray(format="rgb24")``).

Frames from image folders are read like the official code reads YouTube-VIS frames
(detectron2 ``read_image``: Pillow, EXIF orientation applied, converted to RGB). Files are
sorted in natural order (``9.jpg`` before ``10.jpg``; zero-padded names sort as the official
demo's plain ``sort()`` would).

Errors are :class:`~dvis_trt.errors.InputError` with one line saying what, where and
what to do: missing path, a file FFmpeg cannot open, no video stream, no frames, a file that
breaks off or is corrupt midway (the message names the frame), an empty folder.

Modules: :mod:`.base` (Frame, VideoSource), :mod:`.av_source` (video files), :mod:`.images`
(frame folders), :mod:`.source` (:func:`open_source`), :mod:`.ytvis` (dataset json),
:mod:`.prefetch` (background decoding). The public names are re-exported here.
"""
from .av_source import (AVVideoSource, Orientation, orientation_from_display_matrix,
                        orientation_from_rotate_tag)
from .base import Frame, VideoSource
from .images import (IMAGE_EXTENSIONS, ImageSequenceSource, list_frame_files, natural_sort_key,
                     read_image_rgb)
from .prefetch import Prefetcher, prefetch
from .source import open_source
from .ytvis import YtvisVideo, load_ytvis_videos

__all__ = ["AVVideoSource", "Orientation", "orientation_from_display_matrix",
           "orientation_from_rotate_tag", "Frame", "VideoSource", "IMAGE_EXTENSIONS",
           "ImageSequenceSource", "list_frame_files", "natural_sort_key", "read_image_rgb",
           "Prefetcher", "prefetch", "open_source", "YtvisVideo", "load_ytvis_videos"]
