"""Every tunable constant of the dashboard, in one place. Environment variables override a few (named below)."""
from __future__ import annotations

JOB_REFRESH_SECONDS = 2.0
"""Seconds between redraws of a running job's live part (charts, progress, log tail)."""

JOBS_REFRESH_SECONDS = 4.0
"""Seconds between redraws of the jobs table while some job is queued, running or recovering."""

WORKERS_REFRESH_SECONDS = 3.0
"""Seconds between redraws of the workers table (heartbeats are every 2 s)."""

SETTINGS_REFRESH_SECONDS = 5.0
"""Seconds between redraws of the Settings page's webhooks and their delivery logs."""

HOOK_LOG_SHOWN = 20
"""Delivery attempts shown per webhook on the Settings page (the newest; `notify log` shows more)."""

REDIS_RECONNECT_SECONDS = 3.0
"""Seconds between reconnection attempts while the Redis-down banner is shown."""

JOBS_PAGE_LIMIT = 5000
"""Most jobs the jobs table lists (newest first)."""

JOB_PICKER_LIMIT = 300
"""Most recent jobs offered in the job pickers (Job, Compare, Try it); a job linked by URL is always offered."""

CHART_MAX_POINTS = 1500
"""Points per line drawn in a live chart: longer series are thinned (every point stays in the session's series)."""

LIVE_JOBS_CACHED = 32
"""Jobs whose chart series and figures the server keeps for its viewers (app/live.py), most recently viewed first."""

LIVE_LOG_LINES = 40
"""Log lines shown in a job's live log tail on the Job page."""

GALLERY_MAX_IMAGES = 24
"""Misclassified test images shown in a finished job's gallery."""

CONFUSION_HEATMAP_MAX_CLASSES = 50
"""Classes up to which the Job page draws the confusion matrix; above it, the table of the commonest confusions."""

TRY_MAX_IMAGES = 32
"""Most images the Try it page classifies at once (each is decoded in the dashboard's process)."""

TRY_SAMPLES_DEFAULT = 4
"""Test images picked by default on the Try it page."""

TOP_K = 5
"""Predictions shown per image on the Try it page."""

UPLOAD_MAX_MB_ENV = "DASHBOARD_MAX_UPLOAD_MB"
"""Environment variable: largest dataset zip the New-job page accepts, in MB (overrides the default below)."""

UPLOAD_MAX_MB = 500
"""Default largest dataset zip, in MB (Streamlit keeps an upload in memory; bigger sets: `python -m worker submit`)."""

DOWNLOAD_CHUNK_BYTES = 1024**2
"""Bytes the download route (app/downloads.py) reads and sends at a time: what the server holds per download."""

DOWNLOAD_GRANT_SECONDS = 3600.0
"""Seconds a download link drawn on a page stays valid (a page redrawn with half of it left gets a fresh link)."""

DOWNLOAD_GRANTS_MAX = 10_000
"""Most download links a server process remembers; the oldest is forgotten first."""

IMAGE_UPLOAD_MAX_MB = 20
"""Largest single image the Try it page accepts, in MB."""

UPLOADS_KEEP_SECONDS = 24 * 3600
"""Uploaded zips older than this are removed from var/uploads/ (submission copies them into the artifact store)."""

CONFIGS_DIR = "configs"
"""Folder of YAML presets (relative to the repository root) offered on the New-job page."""

DEFAULT_PRESET = "digits"
"""Preset the New-job page starts from."""

HOSTS_ENV = "DASHBOARD_HOSTS"
"""Environment variable: host names (comma-separated, `*.example.com` allowed) the dashboard answers to besides IP
addresses and localhost (app/gate.py: a request under any other name is refused, against DNS rebinding)."""

ADDRESS_ENV = "DASHBOARD_ADDRESS"
"""Environment variable: the interface the dashboard listens on (`python -m app`, the Procfile's `web:` line)."""

ADDRESS = "127.0.0.1"
"""Default interface: loopback only. Any other address exposes the dashboard and needs a login (app/auth.py)."""

ALLOW_OPEN_ENV = "DASHBOARD_ALLOW_OPEN"
"""Environment variable: `1` lets an exposed dashboard start without a login (a network you trust completely)."""

PORT_ENV = "PORT"
"""Environment variable: the dashboard's TCP port (honcho sets it from .env)."""

PORT = 8501
"""Default TCP port of the dashboard."""

SWEEPS_REFRESH_SECONDS = 4.0
"""Seconds between redraws of a running sweep's view on the Sweeps page."""

DATASET_THUMBS_PER_CLASS = 4
"""Images per class shown on the Datasets page."""

DATASET_THUMB_CLASSES = 12
"""Classes whose images the Datasets page shows (the first ones; a dataset may have a thousand)."""

DATASET_THUMBS_SECONDS = 600
"""Seconds the Datasets page keeps a version's thumbnails (a version never changes; the bound is for memory)."""

DATASET_ROOTS_ENV = "DASHBOARD_DATASET_ROOTS"
"""Environment variable: folders (separated by `:`) under which the dashboard may register a `file://` dataset.
Unset: none, as no path a browser user types is read from the dashboard's disk (`python -m worker dataset add` has
no such limit)."""

ALLOWED_EMAILS_ENV = "DASHBOARD_ALLOWED_EMAILS"
"""Environment variable: e-mail addresses (comma-separated) an OIDC sign-in admits (app/auth.py's allow-list)."""

ALLOWED_DOMAINS_ENV = "DASHBOARD_ALLOWED_DOMAINS"
"""Environment variable: e-mail domains (comma-separated, exact: no subdomains) an OIDC sign-in admits."""

ALLOWED_GROUPS_ENV = "DASHBOARD_ALLOWED_GROUPS"
"""Environment variable: groups (comma-separated; the identity token's `groups` claim) an OIDC sign-in admits."""

DEFAULT_ROLE_ENV = "DASHBOARD_DEFAULT_ROLE"
"""Environment variable: the role of an allowed OIDC person who is not a registered user."""

DEFAULT_ROLE = "viewer"
"""Default of DASHBOARD_DEFAULT_ROLE: an allowed stranger may look, not use the GPUs, until an admin registers them."""

AUDIT_PAGE_LIMIT = 2000
"""Newest audit-log entries the Audit page shows (the download holds every entry)."""
