# Install the sdlive OBS script (Windows). Close OBS first. Options: see `py installer\install_obs.py -h`.
$ErrorActionPreference = "Stop"
$here = Split-Path -Parent $MyInvocation.MyCommand.Path
$py = $env:PYTHON
if (-not $py) {
    foreach ($cand in @("py", "python", "python3")) {
        if (Get-Command $cand -ErrorAction SilentlyContinue) { $py = $cand; break }
    }
}
if (-not $py) {
    Write-Error "install.ps1: no Python found; install Python 3.10-3.12 (64-bit) from python.org, or set `$env:PYTHON"
    exit 2
}
& $py (Join-Path $here "install_obs.py") @args
exit $LASTEXITCODE
