"""customers.username and customers.phone: what the channel profile tells about a customer

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 13:00:00

Datasets redact the customer's own name, username and phone number from their conversation's
lessons (learning/datasets.known_names): a generic detector cannot know that "grace_h" is a
person. Telegram gives the username with every message and the phone number only when the
customer shares their own contact. Empty for customers stored before this revision.
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('username', sa.String(length=256), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('phone', sa.String(length=64), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('customers', schema=None) as batch_op:
        batch_op.drop_column('phone')
        batch_op.drop_column('username')
