"""The one error class of tunekit's privacy tools: what was asked cannot be done, and the message says how to fix it
(log store unreachable, no secret for the hash operator, train.pii=refuse found personal data, ...)."""


class PrivacyError(ValueError):
    pass


SECRET_ENV = "TUNEKIT_PII_SECRET"  # the deployment's key for keyed-hash tokens and user pseudonyms
