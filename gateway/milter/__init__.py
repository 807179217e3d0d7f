"""The milter front end: the same engine behind Postfix/Sendmail ``smtpd_milters``."""
