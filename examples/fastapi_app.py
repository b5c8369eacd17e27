"""A FastAPI CRM behind GuardMiddleware: the middleware mode in one file.

Run it from the repository root with a guard config file (README.md,
"Configuration"), whose server.public_url is the address people open:

    MOKO_GUARD_CONFIG=/etc/moko-guard.toml uvicorn examples.fastapi_app:app --port 4180

FastAPI is not a dependency of moko-guard: `pip install fastapi` first. The
guard wraps the whole FastAPI app as pure ASGI middleware, so it also checks
/docs and /openapi.json; list them in access.public_paths to publish them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request

from moko_guard import PRINCIPAL_SCOPE_KEY, GuardMiddleware, Principal, load_settings


def signed_in_user(request: Request) -> Principal:
    """Return the user the guard let in; raise 401 on a public path, where there is none."""
    principal: Principal | None = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None:
        raise HTTPException(status_code=401, detail="sign-in required")
    return principal


User = Annotated[Principal, Depends(signed_in_user)]

crm = FastAPI(title="Sample CRM")


@crm.get("/")
async def home(user: User) -> dict[str, str]:
    return {"deals_of": user.username}


@crm.get("/api/me")
async def me(user: User) -> dict[str, object]:
    return user.to_json()


# load_settings() reads the file named by MOKO_GUARD_CONFIG (default: moko-guard.toml).
app = GuardMiddleware(crm, load_settings())
