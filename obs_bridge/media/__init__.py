"""Frames in and out of the client side (no torch): where they come from, where they go, and the pump between.

- ``capture``: capture sources (webcam, file, image folder, screen, generated clip, another session's output) that
  yield BGR frames.
- ``sinks``: where restyled frames go (virtual webcam, preview window, video file, nowhere).
- ``pump``: capture → daemon session → sinks, live (``sdlive cam``) or every frame in order (``render``, ``demo``).
- ``vcam``: :class:`~sdlive.obs_bridge.media.vcam.StyledCamera`, the pyvirtualcam-sized scripting API.
"""
