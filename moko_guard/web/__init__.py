"""HTML pages: the sign-in page and plain message pages (Jinja2, light and dark theme)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jinja2 import Environment, PackageLoader, select_autoescape

from .i18n import DEFAULT_LANGUAGE, UI_STRINGS, Catalogues
from starlette.responses import HTMLResponse

_env = Environment(
    loader=PackageLoader("moko_guard", "web/templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)

# Plain words for each reason code; details go to the log and the audit record only.
REASON_MESSAGES = {
    "state_mismatch": "The sign-in could not be matched to this browser. Please start again.",
    "flow_expired": "The sign-in took too long. Please start again.",
    "flow_replayed": "This sign-in link was already used. Please start again.",
    "provider_error": "The sign-in provider returned an error. Please try again later.",
    "provider_denied": "The sign-in was cancelled or refused at the provider.",
    "provider_timeout": "The sign-in provider did not answer in time. Please try again later.",
    "provider_unreachable": "The sign-in provider could not be reached. Please try again later.",
    "provider_unavailable": "The sign-in provider is not available right now. Please try again later.",
    "token_invalid": "The answer from the sign-in provider could not be verified.",
    "email_missing": "The sign-in provider did not share an email address for this account.",
    "email_unverified": "The email address of this account is not verified at the provider.",
    "domain_not_allowed": "Accounts with this email domain may not sign in here.",
    "user_disabled": "This account is disabled. Contact your administrator.",
    "role_not_allowed": "This account does not have a role that may use this application.",
    "provisioning_disabled": "There is no account for this identity here. Ask your administrator to create one.",
    "email_in_use": "Another account already uses this email address. Ask your administrator to link them.",
    "identity_taken": "This provider account is already linked to another user.",
    "link_session_mismatch": "Your session ended before the account could be linked. Sign in and try again.",
    "unknown_provider": "This sign-in provider is not configured.",
    "invalid_request": "The sign-in request was incomplete or malformed. Please start again.",
    "store_unavailable": "The service is busy. Please try again in a moment.",
    "session_expired": "Your session has ended. Please sign in again.",
    "session_too_large": "This account holds too many roles to sign in. Contact your "
    "administrator.",
    "rate_limited": "Too many sign-in attempts from your network. Please wait a minute and try again.",
    "hosted_domain_mismatch": "Only accounts of this organization's Google Workspace domain may "
    "sign in here.",
    "tenant_not_allowed": "Accounts of this Microsoft organization may not sign in here.",
    "groups_overage_unresolved": "Your group memberships could not be read from Microsoft. "
    "Please try again later or contact your administrator.",
    "malformed_email": "The email address from the sign-in provider is not a valid address.",
    "subject_invalid": "The sign-in provider did not return a usable account ID.",
    "email_declined": "Facebook did not share your email address. Sign in again and allow "
    "access to your email address.",
    "org_not_allowed": "This GitHub account is not a member of an organization that may sign in here.",
    "team_not_allowed": "This GitHub account is not a member of a team that may sign in here.",
}


def english_strings() -> dict[str, str]:
    """Return the built-in English catalogue: page text and every reason message."""
    strings = dict(UI_STRINGS)
    strings.update({f"reason.{code}": text for code, text in REASON_MESSAGES.items()})
    strings["reason.failed"] = "The sign-in failed. Please try again."
    return strings


DEFAULT_CATALOGUES = Catalogues(english_strings())


def reason_message(reason: str | None, strings: dict[str, str] | None = None) -> str | None:
    if reason is None:
        return None
    table = strings or DEFAULT_CATALOGUES.english
    return table.get(f"reason.{reason}", table["reason.failed"])


@dataclass(frozen=True)
class ProviderButton:
    id: str
    name: str
    start_url: str
    # The provider type ("google", "github", ...), which picks the button's mark.
    kind: str = ""


def render(template: str, status: int = 200, headers: dict[str, str] | None = None,
           **context: object) -> HTMLResponse:
    html = _env.get_template(template).render(**context)
    response_headers = {
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; form-action 'self' https: http:; frame-ancestors 'none'",
        # same-origin, not no-referrer: with no-referrer browsers send "Origin: null" on
        # form posts, which the admin pages check.
        "Referrer-Policy": "same-origin",
        **(headers or {}),
    }
    return HTMLResponse(html, status_code=status, headers=response_headers)


def sign_in_page(
    buttons: Sequence[ProviderButton],
    *,
    reason: str | None = None,
    request_id: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
    language: str = DEFAULT_LANGUAGE,
    catalogues: Catalogues | None = None,
) -> HTMLResponse:
    strings = (catalogues or DEFAULT_CATALOGUES).strings(language)
    return render(
        "sign_in.html", status, {**(headers or {}), "Content-Language": language},
        buttons=buttons, error=reason_message(reason, strings), reason=reason,
        request_id=request_id, t=strings, lang=language,
    )


def message_page(title: str, message: str, *, status: int = 200, request_id: str | None = None,
                 link: str | None = None, link_text: str | None = None,
                 headers: dict[str, str] | None = None,
                 strings: dict[str, str] | None = None, language: str = DEFAULT_LANGUAGE,
                 ) -> HTMLResponse:
    return render("message.html", status, headers, title=title, message=message,
                  request_id=request_id, link=link, link_text=link_text,
                  t=strings or DEFAULT_CATALOGUES.english, lang=language)
