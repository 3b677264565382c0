"""Personal data: one redactor (Presidio + checksummed recognizers), training-data scans, request logs.

    from tunekit.privacy.redactor import Redactor      # find / redact / mask / keyed hash
    from tunekit.privacy.scan import scan_file          # tunekit data scan
    from tunekit.privacy.logstore import LogStore       # request log, retention, erasure, export

(Nothing is imported here: Presidio and spaCy load only when a redactor is built.)
"""

from .errors import PrivacyError

__all__ = ["PrivacyError"]
