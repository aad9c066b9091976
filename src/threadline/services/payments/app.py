"""The payments service's composition root: built from settings."""

from threadline.platform.component import Component
from threadline.platform.db import Database
from threadline.platform.settings import Settings
from threadline.services.payments import events
from threadline.services.payments.api import SERVICE
from threadline.services.payments.http import build_router
from threadline.services.payments.processor import SandboxProcessor
from threadline.services.payments.service import PaymentsService
from threadline.services.payments.store import MIGRATIONS, SqlChargeStore, SqlPaymentStore

__all__ = ["build"]


def build(settings: Settings) -> Component:
    """Build the payments service, charging through the sandbox processor on its own database."""
    database = Database(settings.database_url(SERVICE))
    service = PaymentsService(SqlPaymentStore(database), SandboxProcessor(SqlChargeStore(database)))
    return Component(
        name=SERVICE,
        service=service,
        database=database,
        migrations=[MIGRATIONS],
        router=build_router(service),
        handlers=events.handlers(service),
    )
