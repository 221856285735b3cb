"""`crmhub forms snippet NAME`: a ready HTML form for a hosted webform connector, and
`crmhub forms drain`: process deliveries acknowledged but not yet processed."""

from __future__ import annotations

import asyncio
import html

import typer

from crmhub.cli.common import console, die, open_store, print_json, state
from crmhub.errors import CrmHubError

__all__ = ["register", "snippet_html"]

forms_app = typer.Typer(
    help="Web forms: hosted form snippets and the intake inbox.", no_args_is_help=True
)

_INPUTS = {
    "name": ("text", "name", "Name"),
    "first_name": ("text", "given-name", "First name"),
    "last_name": ("text", "family-name", "Last name"),
    "email": ("email", "email", "Email"),
    "phone": ("tel", "tel", "Phone"),
    "company": ("text", "organization", "Company"),
    "job_title": ("text", "organization-title", "Job title"),
}


def snippet_html(action: str, fields: list[str], honeypot: str) -> str:
    """The form: one labelled input per field, a honeypot people never see, a submit button."""
    lines = [f'<form action="{html.escape(action)}" method="post" accept-charset="utf-8">']
    for name in fields:
        label = _INPUTS.get(name, ("text", "off", name.replace("_", " ").capitalize()))
        kind, autocomplete, text = label
        attr = html.escape(name)
        required = " required" if name == "email" else ""
        if name == "message":
            control = f'<textarea name="{attr}" rows="4"></textarea>'
            text = "Message"
        else:
            control = f'<input type="{kind}" name="{attr}" autocomplete="{autocomplete}"{required}>'
        lines.append(f"  <p><label>{html.escape(text)}<br>{control}</label></p>")
    # Off-screen rather than display:none: some bots skip fields hidden that way.
    lines.append(
        '  <div style="position:absolute;left:-10000px" aria-hidden="true">'
        f'<input type="text" name="{html.escape(honeypot)}" tabindex="-1" autocomplete="off">'
        "</div>"
    )
    lines.append('  <p><button type="submit">Send</button></p>')
    lines.append("</form>")
    return "\n".join(lines)


@forms_app.command("snippet")
def snippet(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A webform connector with hosted = true."),
    base_url: str = typer.Option(
        "http://127.0.0.1:8000", "--base-url", help="Where `crmhub serve` is reachable."
    ),
) -> None:
    """Print a ready-to-paste HTML form that posts to POST /f/NAME."""
    from connectors.webform import WebformConfig
    from sync.sources import load_source

    settings = state(ctx).settings
    try:
        config = load_source(settings, name).config
    except CrmHubError as exc:
        die(str(exc))
    if not isinstance(config, WebformConfig):
        die(f'[connectors.{name}] is not a webform connector (type = "webform")')
    if not config.hosted:
        die(f"[connectors.{name}] needs `hosted = true` to accept HTML forms")
    action = f"{base_url.rstrip('/')}/f/{name}"
    typer.echo(snippet_html(action, config.form_fields, config.honeypot))


@forms_app.command("drain")
def drain(
    ctx: typer.Context,
    follow: bool = typer.Option(
        False, "--follow", help="Keep draining until Ctrl-C (for connectors with process = drain)."
    ),
    interval: float = typer.Option(0.2, help="Seconds between polls with --follow."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable counts."),
) -> None:
    """Process inbox deliveries that were acknowledged but not processed yet."""
    from sync.intake import DrainReport, Intake

    settings = state(ctx).settings
    db = open_store(settings)
    intake = Intake(settings, db)

    async def run() -> DrainReport:
        total = DrainReport()
        while True:
            report = await intake.drain()
            total.processed += report.processed
            total.skipped += report.skipped
            total.failed = report.failed
            if not follow:
                return total
            await asyncio.sleep(interval)

    try:
        report = asyncio.run(run())
    except KeyboardInterrupt:
        return
    finally:
        intake.close()
        db.dispose()
    counts = {"processed": report.processed, "skipped": report.skipped, "failed": report.failed}
    if as_json:
        print_json(counts)
    else:
        console.print(
            f"processed {report.processed}, skipped {report.skipped}, "
            f"failed (in total) {report.failed}"
        )


def register(app: typer.Typer) -> None:
    app.add_typer(forms_app, name="forms")
