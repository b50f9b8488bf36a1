"""Who is who in the review channel: our own workspace and app, the staff, and their display names.

A request counts as staff only when it comes from our own workspace (or Enterprise Grid
organisation) and our own app, as `auth.test` and `bots.info` name them at start, and its user is
staff: on APPRENTICE_STAFF (users and user groups), else a full member of the review channel.
Slack Connect users from other organisations, strangers and guests are never staff, even in the
review channel. Slack's answers are cached for a while; when Slack cannot say, the last answer
stands, or nobody is staff (fail closed). See docs/slack.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.channels.slack.web import AUTH_ERRORS, SlackError, SlackWeb

log = logging.getLogger(__name__)

CHANNEL = "slack"  # the outbox channel, the prefix of a staff id ("slack:U123") and of update claims
STAFF_CACHE_S = 300.0


@dataclass(frozen=True)
class Identity:
    """Our own Slack workspace, Enterprise Grid organisation ("" when none) and app ("" when unknown)."""

    team: str
    enterprise: str = ""
    app: str = ""
    org_wide: bool = False  # installed on a whole organisation: any of its workspaces is ours


class Directory:
    """Slack's answers about people, cached: who we are, who is staff, what to call someone."""

    def __init__(self, web: SlackWeb, review_channel: str, staff: str) -> None:
        self.web, self.review_channel = web, review_channel
        self.staff_users, self.staff_groups = parse_staff(staff)
        self.me: Identity | None = None  # our workspace, organisation and app (auth.test, bots.info)
        self._names: dict[str, str] = {}
        self._staff_cache: tuple[float, frozenset[str]] | None = None
        self._members: dict[str, tuple[float, str]] = {}  # user -> (when, why not staff; "" = may be)

    # --- who we are ---------------------------------------------------------------------------
    async def check_token(self) -> None:
        """Learn who we are; fail on a rejected token, only warn when Slack is merely unreachable."""
        try:
            self.me = await self._identity(await self.web.auth_test())
        except SlackError as exc:
            if exc.error in AUTH_ERRORS:
                raise RuntimeError(
                    f"Slack rejected SLACK_BOT_TOKEN ({exc.error}); copy the Bot User OAuth Token "
                    "(xoxb-...) from the app's 'OAuth & Permissions' page."
                ) from exc
            log.warning("Slack auth.test failed (%s); cards wait in the outbox", exc.error)
        except (OSError, TimeoutError) as exc:
            log.warning("Slack is unreachable (%s); cards wait in the outbox", type(exc).__name__)

    async def _identity(self, auth: Mapping[str, Any]) -> Identity:
        """Who we are, from auth.test's answer and bots.info (the app id; "" when Slack will not say)."""
        app = ""
        bot = str(auth.get("bot_id") or "")
        if bot:
            try:
                app = await self.web.bot_app(bot)
            except (SlackError, OSError, TimeoutError) as exc:
                log.warning(
                    "Slack bots.info failed (%s); requests' app id is not checked", type(exc).__name__
                )
        return Identity(
            team=str(auth.get("team_id") or ""),
            enterprise=str(auth.get("enterprise_id") or ""),
            app=app,
            org_wide=bool(auth.get("is_enterprise_install")),
        )

    async def whoami(self) -> Identity | None:
        """Our identity; asked again when Slack was unreachable at start (None: nobody is staff yet)."""
        if self.me is None:
            with contextlib.suppress(RuntimeError):  # a rejected token: logged by the next start
                await self.check_token()
        return self.me

    # --- who is staff -------------------------------------------------------------------------
    async def is_staff(
        self, user: str, body: Mapping[str, Any], event: Mapping[str, Any] | None = None
    ) -> bool:
        """Whether `user`, acting through the request `body`, is staff: the request comes from our own
        workspace (organisation) and app, the user is on the staff list, and, when the review channel's
        members are the staff, a full member of our workspace (no guest, no Slack Connect user)."""
        me = await self.whoami()
        if me is None:
            log.warning("refused a Slack action: Slack has not said yet which workspace is ours")
            return False
        why = foreign(me, body, event or {})
        if not why and user in await self._staff():
            if self.staff_users or self.staff_groups:
                return True
            why = await self._outsider(user, me)
            if not why:
                return True
        if why:
            log.info("refused a Slack action by %s: %s", user, why)
        return False

    async def _outsider(self, user: str, me: Identity) -> str:
        """Why a member of the review channel is not staff ("" when a full member of our workspace).

        users.info, cached like the staff list; when Slack cannot say, the last answer or a refusal."""
        now = time.monotonic()
        cached = self._members.get(user)
        if cached is not None and now - cached[0] < STAFF_CACHE_S:
            return cached[1]
        try:
            info = await self.web.user(user)
        except (SlackError, OSError, TimeoutError, KeyError, TypeError) as exc:
            log.warning("could not look up Slack user %s (%s)", user, type(exc).__name__)
            return cached[1] if cached is not None else "users.info failed"
        why = not_a_member(info, me)
        self._members[user] = (now, why)
        return why

    async def _staff(self) -> frozenset[str]:
        """APPRENTICE_STAFF users and groups, else the review channel's members (cached a while)."""
        if not self.staff_groups and self.staff_users:
            return self.staff_users
        now = time.monotonic()
        if self._staff_cache is not None and now - self._staff_cache[0] < STAFF_CACHE_S:
            return self._staff_cache[1]
        found: set[str] = set(self.staff_users)
        try:
            if self.staff_groups:
                for group in self.staff_groups:
                    found.update(await self.web.group_members(group))
            else:
                found.update(await self.web.channel_members(self.review_channel))
        except (SlackError, OSError, TimeoutError) as exc:
            log.warning("could not read the staff list from Slack (%s)", type(exc).__name__)
            # fail closed, but keep a previous answer while Slack is unreachable
            return self._staff_cache[1] if self._staff_cache else frozenset(self.staff_users)
        staff = frozenset(found)
        self._staff_cache = (now, staff)
        return staff

    # --- names --------------------------------------------------------------------------------
    async def names_for(self, actors: set[str]) -> dict[str, str]:
        return {a: await self.display(a) for a in actors}

    async def display(self, actor: str) -> str:
        """`@name` for a Slack staff id ("slack:U123"), the actor itself otherwise."""
        if not actor.startswith(f"{CHANNEL}:"):
            return actor
        user = actor.split(":", 1)[1]
        if user not in self._names:
            try:
                info = await self.web.user(user)
                profile = info.get("profile") or {}
                name = profile.get("display_name") or info.get("real_name") or info.get("name") or user
                self._names[user] = f"@{name}"
            except (SlackError, OSError, TimeoutError, KeyError):
                return f"<@{user}>"  # Slack itself renders this as @name
        return self._names[user]


def _id_of(value: Any) -> str:
    return str(value.get("id") or "") if isinstance(value, dict) else ""


def foreign(me: Identity, body: Mapping[str, Any], event: Mapping[str, Any]) -> str:
    """Why a request does not come from our workspace and app ("" when it does).

    The team and organisation the request was made in (`team.id` of interactivity payloads,
    `team_id` of events and commands), the acting user's own team (Slack Connect users keep
    theirs: `user.team_id`, an event's `user_team`) and the app (`api_app_id`)."""
    team = _id_of(body.get("team")) or str(body.get("team_id") or "")
    enterprise = _id_of(body.get("enterprise")) or str(body.get("enterprise_id") or "")
    user = body.get("user")
    user_team = str((user.get("team_id") if isinstance(user, dict) else "") or event.get("user_team") or "")
    app = str(body.get("api_app_id") or "")
    if me.org_wide:
        if enterprise != me.enterprise:
            return f"the request came from organisation {enterprise or '(none)'}"
    else:
        if team != me.team:
            return f"the request came from team {team or '(none)'}"
        if enterprise and enterprise != me.enterprise:
            return f"the request came from organisation {enterprise}"
        if user_team and user_team != me.team:
            return f"a user of team {user_team} (Slack Connect)"
    if me.app and app and app != me.app:
        return f"the request is for app {app}"
    return ""


def not_a_member(info: dict[str, Any], me: Identity) -> str:
    """Why a users.info user is not a full member of our workspace ("" when they are)."""
    if info.get("is_stranger"):
        return "an external user (Slack Connect)"
    if info.get("is_restricted") or info.get("is_ultra_restricted"):
        return "a guest account"
    if info.get("deleted") or info.get("is_bot"):
        return "a deactivated account or a bot"
    if me.org_wide:
        grid = info.get("enterprise_user")
        if not isinstance(grid, dict) or grid.get("enterprise_id") != me.enterprise:
            return "a user outside our organisation"
    elif info.get("team_id") != me.team:
        return f"a user of team {info.get('team_id')} (Slack Connect)"
    return ""


def parse_staff(value: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """APPRENTICE_STAFF: user ids (U..., W...) and user group ids (S...)."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    return frozenset(x for x in items if not x.startswith("S")), tuple(x for x in items if x.startswith("S"))
