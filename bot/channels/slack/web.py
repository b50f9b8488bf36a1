"""Every call the review channel makes to Slack's Web API, through slack_sdk's AsyncWebClient.

The rest of the package sees plain dicts and one exception, `SlackError`, that says what Slack
answered (its error code, the HTTP status, Retry-After, the scope it wants), so only this module and
the app (bolt) import the SDK.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.web.async_client import AsyncWebClient

# Errors that mean the token itself is refused: start-up fails on them instead of waiting
AUTH_ERRORS = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}


class SlackError(Exception):
    """Slack refused a call, or the call never reached a Web API method (an upload step failed)."""

    def __init__(
        self, error: str, status: int = 0, retry_after: float = 1.0, needed: str = "", detail: str = ""
    ) -> None:
        super().__init__(detail or f"Slack error {status} {error}")
        self.error, self.status, self.retry_after, self.needed = error, status, retry_after, needed
        self.upload = bool(detail)  # the file upload itself (not a Web API method) failed

    @classmethod
    def of(cls, exc: SlackApiError) -> SlackError:
        """What an SDK error says: the `error` field, the status, Retry-After and the needed scope."""
        data = getattr(exc.response, "data", None)
        data = data if isinstance(data, dict) else {}
        headers = getattr(exc.response, "headers", None) or {}
        try:
            retry_after = max(0.0, float(headers.get("Retry-After", 1)))
        except (TypeError, ValueError):
            retry_after = 1.0
        return cls(
            str(data.get("error", "")),
            int(getattr(exc.response, "status_code", 0) or 0),
            retry_after,
            str(data.get("needed") or ""),
        )


class SlackWeb:
    """The bot token's Web API client (`client` is handed to bolt too)."""

    def __init__(self, token: str, api_url: str) -> None:
        self.client = AsyncWebClient(
            token=token, base_url=api_url if api_url.endswith("/") else api_url + "/"
        )

    async def _call(self, method: Callable[..., Awaitable[Any]], **params: Any) -> dict[str, Any]:
        try:
            response = await method(**params)
        except SlackApiError as exc:
            raise SlackError.of(exc) from exc
        except SlackRequestError as exc:  # files_upload_v2's upload step: no Web API answer to read
            raise SlackError("upload_failed", detail=f"Slack file upload failed: {exc}") from exc
        data = getattr(response, "data", None)
        return data if isinstance(data, dict) else {}

    # --- who we are and who they are ----------------------------------------------------------
    async def auth_test(self) -> dict[str, Any]:
        return await self._call(self.client.auth_test)

    async def bot_app(self, bot: str) -> str:
        """The app id of one of our bots ("" when Slack does not say)."""
        found = await self._call(self.client.bots_info, bot=bot)
        return str((found.get("bot") or {}).get("app_id") or "")

    async def user(self, user: str) -> dict[str, Any]:
        """users.info's user object; KeyError when the answer has none."""
        found = (await self._call(self.client.users_info, user=user))["user"]
        return found if isinstance(found, dict) else {}

    async def group_members(self, group: str) -> list[str]:
        found = await self._call(self.client.usergroups_users_list, usergroup=group)
        return list(found.get("users") or [])

    async def channel_members(self, channel: str) -> list[str]:
        """Every member of `channel`, page after page."""
        members: list[str] = []
        cursor = None
        while True:
            found = await self._call(
                self.client.conversations_members, channel=channel, limit=1000, cursor=cursor
            )
            members.extend(found.get("members") or [])
            cursor = (found.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return members

    # --- posting --------------------------------------------------------------------------------
    async def post(self, **params: Any) -> dict[str, Any]:
        """chat.postMessage; the answer carries the new message's `ts`."""
        return await self._call(self.client.chat_postMessage, **params)

    async def update(self, **params: Any) -> None:
        await self._call(self.client.chat_update, **params)

    async def ephemeral(self, **params: Any) -> None:
        await self._call(self.client.chat_postEphemeral, **params)

    async def upload(self, **params: Any) -> None:
        """files_upload_v2: reserve an upload URL, upload, complete (a failed upload: SlackError.upload)."""
        await self._call(self.client.files_upload_v2, **params)

    async def open_view(self, trigger_id: str, view: dict[str, Any]) -> None:
        await self._call(self.client.views_open, trigger_id=trigger_id, view=view)
