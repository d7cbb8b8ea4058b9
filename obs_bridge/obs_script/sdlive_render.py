"""The filter's work on OBS's graphics thread: render the parent source into a texture at the session's size, hand
its pixels to the daemon's input ring, upload the newest output frame from the output ring, draw.

Nothing here waits. Capture uses two stage surfaces: each frame stages the new texture and maps the surface staged
one frame earlier, whose copy has finished, so the GPU never stalls; its pixels go into the input ring in one copy.
Output frames are uploaded with ``gs_texture_set_image`` straight from the ring's shared memory. All methods run on
the graphics thread (inside video_render, or inside ``graphics()`` for ``destroy``).
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import obspython as obs
from sdlive_contract import constants
from sdlive_obs_api import U32, Vec4, lib

PIXEL_FORMAT = "bgra"  # the GS_BGRA texrender, stage surfaces and output texture below
BYTES_PER_PIXEL = constants.PIXEL_FORMATS[PIXEL_FORMAT].bytes_per_pixel
SIZE_MULTIPLE = constants.SIZE_MULTIPLE  # the daemon's sessions take multiples of it


def session_size(width: int, height: int) -> tuple[int, int]:
    """The size the daemon session runs at: the source's, rounded down to multiples of SIZE_MULTIPLE; the filter
    scales to it and back."""
    return (
        max(SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE),
        max(SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE),
    )


class FrameBridge:
    """The graphics objects of one filter instance and the copies between them and the rings."""

    def __init__(self) -> None:
        self.size = (0, 0)
        self.texrender: int | None = None
        self.stages: list[int | None] = [None, None]
        self.staged = [False, False]
        self.stage_idx = 0
        self.out_tex: int | None = None
        self.have_output = False  # out_tex holds a styled frame
        self._pack_buf: bytearray | None = None

    def ensure(self, width: int, height: int) -> None:
        """Graphics objects for a width×height session (re-created when the size changes)."""
        if self.size == (width, height) and self.texrender:
            return
        self.destroy()
        self.texrender = lib.gs_texrender_create(obs.GS_BGRA, obs.GS_ZS_NONE)
        self.stages = [lib.gs_stagesurface_create(width, height, obs.GS_BGRA) for _ in range(2)]
        self.out_tex = lib.gs_texture_create(width, height, obs.GS_BGRA, 1, None, obs.GS_DYNAMIC)
        self.size = (width, height)

    def destroy(self) -> None:
        if self.texrender:
            lib.gs_texrender_destroy(self.texrender)
        for stage in self.stages:
            if stage:
                lib.gs_stagesurface_destroy(stage)
        if self.out_tex:
            lib.gs_texture_destroy(self.out_tex)
        self.texrender, self.stages, self.out_tex = None, [None, None], None
        self.staged = [False, False]
        self.size = (0, 0)
        self.have_output = False
        self._pack_buf = None

    def capture(self, filter_source: int, width: int, height: int, ring: Any) -> bool:
        """Render what the filter receives (its target, width×height) into the session-sized texrender (scaled when
        the sizes differ), stage it, and copy the frame staged one frame earlier into the input ``ring``. True when
        a frame went out."""
        tr = self.texrender
        sw, sh = self.size
        lib.gs_texrender_reset(tr)
        if lib.gs_texrender_begin(tr, sw, sh):
            clear = Vec4(0.0, 0.0, 0.0, 0.0)
            lib.gs_clear(obs.GS_CLEAR_COLOR, ctypes.byref(clear), 0.0, 0)
            lib.gs_ortho(0.0, float(width), 0.0, float(height), -100.0, 100.0)
            # As obs_source_process_filter_begin does: its blend, then the target drawn the way libobs draws a
            # skipped filter's target (the default effect's loop for a plain source, its own render for async and
            # custom-draw ones, the previous filter otherwise). A bare obs_source_video_render of a filtered image
            # source runs outside any effect and draws nothing.
            lib.gs_blend_state_push()
            lib.gs_blend_function_separate(obs.GS_BLEND_SRCALPHA, obs.GS_BLEND_INVSRCALPHA, obs.GS_BLEND_ONE,
                                           obs.GS_BLEND_INVSRCALPHA)
            lib.obs_source_skip_video_filter(filter_source)
            lib.gs_blend_state_pop()
            lib.gs_texrender_end(tr)
        cur = self.stage_idx
        prev = cur ^ 1
        lib.gs_stage_texture(self.stages[cur], lib.gs_texrender_get_texture(tr))
        self.staged[cur] = True
        self.stage_idx = prev
        if not self.staged[prev]:
            return False
        ptr = ctypes.c_void_p()
        linesize = U32()
        if not lib.gs_stagesurface_map(self.stages[prev], ctypes.byref(ptr), ctypes.byref(linesize)):
            return False
        try:
            assert ptr.value is not None
            row = sw * BYTES_PER_PIXEL
            pixels: Any
            if linesize.value == row:
                pixels = (ctypes.c_char * (row * sh)).from_address(ptr.value)
            else:  # padded rows: pack them (still one pass over the frame)
                if self._pack_buf is None or len(self._pack_buf) != row * sh:
                    self._pack_buf = bytearray(row * sh)
                base = ctypes.addressof((ctypes.c_char * (row * sh)).from_buffer(self._pack_buf))
                for y in range(sh):
                    ctypes.memmove(base + y * row, ptr.value + y * linesize.value, row)
                pixels = self._pack_buf
            ring.write(pixels, timestamp_ns=time.monotonic_ns())
            return True
        finally:
            lib.gs_stagesurface_unmap(self.stages[prev])

    def fetch_output(self, ring: Any) -> int | None:
        """Upload the newest frame of the output ``ring`` into out_tex, straight from shared memory. Returns that
        frame's capture timestamp (monotonic ns; 0 if unknown) when a new frame was uploaded whole, else None."""
        frame = ring.read_latest(copy=False)  # a read-only view into the slot: no copy here
        if frame is None:
            return None
        sw, sh = self.size
        row = sw * BYTES_PER_PIXEL
        if len(frame.data) < row * sh:
            return None
        lib.gs_texture_set_image(self.out_tex, ring.pixels_address(frame.seq), row, False)
        if not ring.still_valid(frame):
            return None  # the daemon lapped us during the upload (4 slots: practically never); the next frame fixes it
        self.have_output = True
        return int(frame.timestamp_ns)

    def draw_output(self, width: int, height: int) -> None:
        """Draw the newest styled frame over the filter's width×height area (stretched when the session size was
        rounded)."""
        effect = lib.obs_get_base_effect(obs.OBS_EFFECT_DEFAULT)
        while lib.gs_effect_loop(effect, b"Draw"):
            lib.obs_source_draw(self.out_tex, 0, 0, width, height, False)
