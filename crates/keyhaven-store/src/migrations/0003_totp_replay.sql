-- The time step of the last one-time password each account used: a code is
-- accepted once (a replayed code within its 90 s window is refused).
ALTER TABLE users ADD COLUMN totp_last_step INTEGER;
