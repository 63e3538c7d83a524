"""Credentials never leave the process in text: every URL the project prints, logs or stores is scrubbed.

* :func:`scrub` masks what a URL can carry as a secret: the user-info part (``s3://KEY:SECRET@bucket``,
  ``https://user:token@host``) and signed or token query values (``X-Amz-Signature=``, ``token=``, ...).
* :func:`install_log_scrubber` makes every log record (ours, Prefect's, any library's, tracebacks too)
  pass through :func:`scrub` when it is created, so no handler (terminal, log file, Prefect's API log
  handler that stores run logs in its database) ever sees a secret.
* :func:`refuse_credentials` is the one-line error for a URL we would store (a data root, a recipe
  source path): credentials belong in the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
  an AWS profile, ``HF_TOKEN``), never in run records, manifests or flow parameters.

>>> scrub("s3://AKIAXX:abc/def@bucket/data and https://u:tok@host/x?a=1&X-Amz-Signature=f00")
's3://***@bucket/data and https://***@host/x?a=1&X-Amz-Signature=***'
>>> scrub("s3://bucket/data")
's3://bucket/data'
"""

from __future__ import annotations

import logging
import re
import traceback
from typing import Any

from kalm.core.errors import KalmError

MASK = "***"
# scheme://user[:password]@ : the user-info part of a URL (user names alone can be access keys, too).
# A password may hold "/" and "+" (AWS secret keys do); a user name never holds "/" or ":".
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://)[^\s/?#@:'\"]+(?::[^\s@'\"]*)?@")
_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-(?:signature|credential|security-token)|signature|sig|token|access_token|api_key"
    r"|apikey|secret|password|key)=)[^&\s'\"#]+"
)


def scrub(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    return _QUERY.sub(rf"\g<1>{MASK}", _USERINFO.sub(rf"\g<1>{MASK}@", text))


def has_credentials(url: str) -> bool:
    return scrub(url) != url


def refuse_credentials(url: str, what: str) -> None:
    """A one-line error (the URL scrubbed) when ``url`` carries credentials."""
    if has_credentials(url):
        raise KalmError(
            f"{what} {scrub(url)}: credentials in a URL are refused (they would be printed and stored in run "
            "records); use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an AWS profile) and HF_TOKEN instead"
        )


_installed = False


def install_log_scrubber() -> None:
    """Scrub every log record as it is created (message, arguments and traceback); idempotent."""
    global _installed
    if _installed:
        return
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it for the handler to report
            return record
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = scrub(text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
