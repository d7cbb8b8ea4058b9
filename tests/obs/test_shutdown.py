"""OBS shuts down cleanly with sdlive filters on several sources of different kinds, in every order libobs may take:
quitting OBS (the script unloads during the scene-data cleanup while the filters still exist, they are destroyed
after it), the script reloaded while its filters live (Tools → Scripts → Reload) and unloaded with its collection
(the filters destroyed after it, then loaded again), removing filtered sources after a reload, and a filter that
outlives OBS's Python. Each start/stop cycle checks the exit status and the log for a crash, a traceback or a hang.

OBS is quit as a user does, by closing its main window (tests/obs/harness.py, ``QUIT_SCRIPT``). Quitting by SIGINT
(Ctrl-C in a terminal) is tested apart: OBS 29 itself crashes or hangs now and then on SIGINT with a media source in
the scene, with no script loaded at all (``OBS_SIGINT_EXIT_FAULTS``)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from .conftest import ObsUnderTest
from .harness import SCRIPT

pytestmark = [pytest.mark.obs, pytest.mark.slow]

CYCLES = 5
CRASH_SIGNS = re.compile(r"Segmentation fault|SIGSEGV|Fatal Python error|Traceback|core dumped|Crash", re.I)

# OBS 29's own exit faults on SIGINT (issue 16), Debian obs-studio 29.0.2 (Qt 5) under Xvfb, with a media source
# (ffmpeg_source, which has a volume meter in the audio mixer) in the scene. OBS 29.0.2 runs its whole shutdown inside
# its SIGINT handler (a hang's backtrace: QWidgetPrivate::close_helper right above "<signal handler called>", on top
# of libxcb's writev), on top of whatever the main thread was doing; the meter repaints all the time, so that is often
# Qt or X11 code:
# - a hang right after "==== Shutting down": the close, inside the handler, waits for libxcb's lock, which the
#   interrupted code holds;
# - SIGSEGV in the main thread right after "All scene data cleared": a posted event repaints a freed widget (cores
#   of 2026-12-03, 5/5: the media source's audio-mixer VolumeMeter, left in Qt's dirty-widget list; a core of
#   2026-12-04 with no script loaded: the same stack).
# Measured 2026-12-04 (N quits: SIGSEGV / hangs), colour + image + text + media sources, quit by SIGINT:
#   no script loaded, no filter, environment as the tests got it (pyenv on PATH): 80: 3 / 3
#   no script loaded, no filter, environment pinned (harness.obs_environment):   88: 4 / 1
#   sdlive filters on all four, environment pinned:                               80: 2 / 2
#   sdlive filters on all four, environment as the tests got it:                  40: 3 / 0
#   sdlive filters on four kinds without audio (WITHOUT_AUDIO), pinned:           80: 0 / 0
# Quit by closing the main window instead (the harness's way, as a user's), pinned:
#   no script loaded but the quit helper, no filter, the four sources above:      80: 0 / 0
#   sdlive filters on all four:                                                   80: 0 / 0
OBS_SIGINT_EXIT_FAULTS = "OBS 29's own crash/hang on SIGINT with a media source in the scene (no script needed)"

W, H = 320, 176
SOURCES = {  # name: (kind, settings); media fixture files
    "colour": ("color_source_v3", lambda m: {"color": 0xFF2060C0, "width": W, "height": H}),
    "image": ("image_source", lambda m: {"file": str(m["image"])}),
    "slides": ("slideshow", lambda m: {"files": [{"value": str(m["slide"]), "hidden": False, "selected": False}],
                                       "use_custom_size": f"{W}x{H}"}),
    "text": ("text_ft2_source_v2", lambda m: {"text": "sdlive", "font": {"face": "DejaVu Sans", "size": 64}}),
    "media": ("ffmpeg_source", lambda m: {"local_file": str(m["video"]), "looping": True, "is_local_file": True}),
}
FOUR_KINDS = ("colour", "image", "media", "text")  # the daemon's default capacity: 4 sessions
WITHOUT_AUDIO = ("colour", "image", "slides", "text")  # four kinds, none in OBS's audio mixer


def filtered_sources(o: ObsUnderTest, daemon, media, sources=FOUR_KINDS) -> list[str]:
    """Sources of different kinds, each with an sdlive filter connected to ``daemon`` (its session capacity)."""
    names = []
    for name in sources:
        kind, settings = SOURCES[name]
        o.client.create_input("Main", name, kind, settings(media), True)
        o.add_filter(daemon.control_address, name, f"sdlive-{name}")
        names.append(f"sdlive-{name}")
    return names


def wait_connected(o: ObsUnderTest, names: list[str]) -> None:
    o.wait_for(lambda: all(o.filter_stats(n).get("frames_in", 0) > 3 for n in names), 60,
               "every filter to send frames")


def assert_clean_exit(o: ObsUnderTest, rc: int | None, what: str, destroyed: list[str] = ()) -> None:
    """Exit status 0, no crash sign, OBS's shutdown finished, and each filter in ``destroyed`` logged its destroy."""
    log = o.obs.log_text()
    sign = CRASH_SIGNS.search(log)
    assert rc == 0, f"{what}: OBS exited with {rc} ({-rc if rc and rc < 0 else ''} = signal)\n{log[-3000:]}"
    assert sign is None, f"{what}: the log shows {sign.group(0)!r}:\n{log[max(0, sign.start() - 2000):][:3000]}"
    assert "Number of memory leaks" in log, f"{what}: OBS did not finish its shutdown"
    for f in destroyed:
        assert f"filter '{f}' destroyed" in log, f"{what}: no destroy logged for {f}:\n{o.sdlive_log()}"


@pytest.mark.parametrize("cycle", range(CYCLES))
def test_quitting_obs_with_several_filtered_sources_exits_cleanly(cycle, tmp_path_factory, obs_daemon, media):
    o = ObsUnderTest(tmp_path_factory.mktemp(f"obs-quit{cycle}"), {}).start()
    try:
        names = filtered_sources(o, obs_daemon, media)
        wait_connected(o, names)
        if cycle % 2:  # on the odd cycles quit once more, with the filters restored from the saved collection
            rc = o.stop()
            assert_clean_exit(o, rc, f"cycle {cycle}, first run", names)
            port = o.obs.ws_port
            o.stats_path.unlink()
            o = ObsUnderTest(o.home, {})
            o.obs.ws_port = port  # the config written by the first run (global.ini holds this port)
            o.start()
            wait_connected(o, names)
    finally:
        rc = o.stop()
    assert_clean_exit(o, rc, f"cycle {cycle}", names)


def test_reloading_the_script_while_filters_live_then_quitting_exits_cleanly(tmp_path_factory, obs_daemon, media):
    """A scene-collection switch unloads and reloads the script with the filters alive; then sources are removed
    and OBS quits."""
    o = ObsUnderTest(tmp_path_factory.mktemp("obs-reload"), {}).start()
    try:
        names = filtered_sources(o, obs_daemon, media)
        wait_connected(o, names)
        o.client.create_scene_collection("other")  # the script unloads; the filters are destroyed after it
        o.wait_for(lambda: not obs_daemon.sessions(), 15, "the destroyed filters to close their sessions")
        o.stats_path.unlink()  # the unloaded script's last snapshot
        o.client.set_current_scene_collection("sdlive")  # the script loads again in the same process
        wait_connected(o, names)
        o.client.remove_input("image")
        o.wait_for(lambda: not o.filter_stats("sdlive-image"), 10, "the removed source's filter to go")
    finally:
        rc = o.stop()
    assert_clean_exit(o, rc, "reload")


# A second script that takes a reference to a source and never gives it back (as a buggy plugin or script may): the
# source, and its sdlive filter, then outlive the scene-data cleanup and OBS's Python, and libobs destroys them
# while freeing its data, after the scripting module finalized Python.
HOLDER = """
import obspython as obs
held = []
def grab():
    src = obs.obs_get_source_by_name("colour")
    if src is not None:
        held.append(src)
        obs.timer_remove(grab)
def script_load(settings):
    obs.timer_add(grab, 200)
"""


def test_a_filter_destroyed_after_obs_finalized_python_does_not_crash(tmp_path_factory, obs_daemon, media):
    home = tmp_path_factory.mktemp("obs-held")
    holder = Path(home) / "hold_source.py"
    holder.write_text(HOLDER)
    o = ObsUnderTest(home, {})
    o.obs.scripts = [SCRIPT, holder]
    o.start()
    try:
        names = filtered_sources(o, obs_daemon, media)
        wait_connected(o, names)
    finally:
        rc = o.stop()
    assert_clean_exit(o, rc, "source held past the Python finalization")
    log = o.obs.log_text()
    assert "Python is finalizing: 1 live filter(s) released" in log, log[-2000:]


def ctrl_c(o: ObsUnderTest) -> int | None:
    """Quit by SIGINT, as Ctrl-C in the terminal OBS was started from."""
    if o.client is not None:
        o.client.disconnect()
        o.client = None
    return o.obs.stop(sigint=True)


SIGINT_QUITS = 2


def test_ctrl_c_with_filtered_sources_without_audio_exits_cleanly(tmp_path_factory, obs_daemon, media):
    for quit in range(SIGINT_QUITS):
        o = ObsUnderTest(tmp_path_factory.mktemp(f"obs-sigint{quit}"), {}).start()
        try:
            names = filtered_sources(o, obs_daemon, media, WITHOUT_AUDIO)
            wait_connected(o, names)
        finally:
            rc = ctrl_c(o)
        assert_clean_exit(o, rc, f"SIGINT {quit}", names)


def obs_sigint_exit_fault(rc: int | None, log: str, filters: list[str]) -> str | None:
    """Which of OBS's own SIGINT exit faults (``OBS_SIGINT_EXIT_FAULTS``) a quit ended in, if any: "hang" right after
    the shutdown began (killed by the harness with nothing logged after "==== Shutting down"), or "SIGSEGV" right
    after the shutdown's scene cleanup (the script unloaded and every sdlive filter destroyed, each logged, before it)
    and before libobs freed its context; never with anything of ours (a traceback, a Python fatal error) in the log."""
    if re.search(r"Traceback|Fatal Python error", log) or "==== Shutting down" not in log:
        return None
    shutdown = log[log.rfind("==== Shutting down"):]  # the last copy (OBS prints its log to stdout too)
    if rc == -signal.SIGKILL and len(shutdown.strip().splitlines()) == 1:
        return "hang"
    cleared = shutdown.find("All scene data cleared")
    if (rc == -signal.SIGSEGV and cleared >= 0 and "Freeing OBS context data" not in shutdown[cleared:]
            and all(0 <= shutdown.find(f"filter '{f}' destroyed") < cleared for f in filters)):
        return "SIGSEGV"
    return None


def test_ctrl_c_with_a_filtered_media_source_fails_only_by_obs_own_faults(tmp_path_factory, obs_daemon, media):
    """A media source filtered beside a colour source, quit by SIGINT: every quit exits cleanly, or ends in one of
    OBS 29's own SIGINT faults (an expected failure then, with the count); anything else fails."""
    known = []
    for quit in range(SIGINT_QUITS):
        o = ObsUnderTest(tmp_path_factory.mktemp(f"obs-sigint-media{quit}"), {}).start()
        try:
            names = filtered_sources(o, obs_daemon, media, ("media", "colour"))
            wait_connected(o, names)
        finally:
            rc = ctrl_c(o)
        fault = obs_sigint_exit_fault(rc, o.obs.log_text(), names)
        if fault:
            known.append(fault)
            continue
        assert_clean_exit(o, rc, f"SIGINT {quit} with a media source", names)
    if known:
        pytest.xfail(f"{OBS_SIGINT_EXIT_FAULTS}: {', '.join(known)} in {SIGINT_QUITS} quits")


# A second script that does what Tools → Scripts → "Reload Scripts" does to the sdlive script (obs_script_reload, on
# OBS's UI thread) each time the test creates the trigger file: the sdlive module is unloaded and run again while
# its filters stay alive (unlike a collection switch, which destroys them).
RELOADER = """
import ctypes, os, sys
import obspython as obs
TRIGGER = os.path.join(os.environ["HOME"], "reload-sdlive")
def _lib(part):
    with open("/proc/self/maps") as maps:
        path = next(line.split()[-1] for line in maps if part in line.rsplit("/", 1)[-1])
    return ctypes.CDLL(path)
libobs, scripting = _lib("libobs.so"), _lib("libobs-scripting.so")
TASK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
reload_task = TASK(ctypes.cast(scripting.obs_script_reload, ctypes.c_void_p).value)
libobs.obs_queue_task.argtypes = [ctypes.c_int, TASK, ctypes.c_void_p, ctypes.c_bool]
ctypes.pythonapi.PyCapsule_GetPointer.restype = ctypes.c_void_p
ctypes.pythonapi.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
def poll():
    if os.path.exists(TRIGGER):
        os.unlink(TRIGGER)
        script = ctypes.pythonapi.PyCapsule_GetPointer(sys.modules["sdlive_filter"].__script_data__, None)
        obs.script_log(obs.LOG_INFO, "reloading sdlive_filter")
        libobs.obs_queue_task(0, reload_task, script, False)  # OBS_TASK_UI, as the Reload button
def script_load(settings):
    obs.timer_add(poll, 100)
"""


def test_reloading_the_script_with_filters_alive_keeps_them_running_and_quits_cleanly(tmp_path_factory, obs_daemon,
                                                                                      media):
    """Reload Scripts twice while four filters run: they keep sending frames on the new code's callbacks; then a
    filtered source is removed (destroyed through the reloaded module) and a new one added (created by it), and OBS
    quits with every filter destroyed."""
    home = tmp_path_factory.mktemp("obs-reload-live")
    reloader = Path(home) / "reload_sdlive.py"
    reloader.write_text(RELOADER)
    o = ObsUnderTest(home, {})
    o.obs.scripts = [SCRIPT, reloader]
    o.start()
    try:
        names = filtered_sources(o, obs_daemon, media, WITHOUT_AUDIO)
        wait_connected(o, names)
        for n in (2, 3):
            before = {f: o.filter_stats(f)["frames_in"] for f in names}
            (Path(home) / "reload-sdlive").touch()
            # an unload joins each live filter's worker (its session closed first): seconds on a loaded machine
            o.wait_for(lambda n=n: sum("script loaded" in ln for ln in o.sdlive_log_lines()) >= n, 60,
                       f"load {n} of the script")
            o.wait_for(lambda b=before: all(o.filter_stats(f).get("frames_in", 0) > b[f] + 3 for f in names), 30,
                       "every filter to keep sending frames after the reload")
        assert "filter already registered in this OBS process" in o.sdlive_log()
        o.client.remove_input("image")
        o.wait_for(lambda: not o.filter_stats("sdlive-image"), 10, "the removed source's filter to go")
        kind, settings = SOURCES["colour"]
        o.client.create_input("Main", "colour2", kind, settings(media), True)
        o.add_filter(obs_daemon.control_address, "colour2", "sdlive-colour2")
        wait_connected(o, ["sdlive-colour2"])
    finally:
        rc = o.stop()
    assert_clean_exit(o, rc, "reload with filters alive", names + ["sdlive-colour2"])
