"""A replica's connection to the dealer: fetch this party's material for one request id."""

from __future__ import annotations

import json
import ssl

import httpx

from service.api import auth, wire
from service.api.errors import ApiError
from service.mpc.dealer import PartyMaterial, Request


class DealerClient:
    def __init__(
        self,
        url: str,
        secret: bytes,
        party: int,
        *,
        timeout: float,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        self.url = url.rstrip("/")
        self._secret, self.party = secret, party
        self._http = httpx.Client(timeout=timeout, verify=verify)

    def fetch(self, request_id: str, plan: tuple[Request, ...]) -> PartyMaterial:
        body = json.dumps(
            {"request_id": request_id, "party": self.party, "plan": wire.plan_to_json(plan)}
        ).encode()
        headers = {
            auth.AUTH_HEADER: auth.dealer_tag(self._secret, self.party, body),
            "content-type": "application/json",
        }
        try:
            r = self._http.post(f"{self.url}/v1/randomness", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ApiError(
                "dealer_unavailable", f"cannot reach the dealer at {self.url}: {exc}"
            ) from None
        if r.status_code == 409:
            raise ApiError("replayed_request", f"the dealer already served {request_id!r}")
        if r.status_code != 200:
            raise ApiError("dealer_unavailable", f"the dealer refused ({r.status_code}): {r.text}")
        try:
            return wire.material_from_bytes(r.content, request_id, self.party, plan)
        except wire.WireError as exc:
            raise ApiError("dealer_unavailable", f"the dealer sent garbage: {exc}") from None

    def close(self) -> None:
        self._http.close()
