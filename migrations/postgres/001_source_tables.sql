-- Source tables of SPEC §2, for the local stack, the demo and the tests.
-- In production these belong to the application; engagement-cdc only reads them.
CREATE TABLE IF NOT EXISTS content (
  content_id      BIGINT PRIMARY KEY,
  content_type    TEXT NOT NULL,
  length_seconds  INT
);

CREATE TABLE IF NOT EXISTS engagement_events (
  id            BIGSERIAL PRIMARY KEY,
  content_id    BIGINT NOT NULL REFERENCES content(content_id),
  user_id       BIGINT NOT NULL,
  event_type    TEXT NOT NULL,
  event_ts      TIMESTAMPTZ NOT NULL DEFAULT now(),
  duration_ms   INT,
  device        TEXT,
  raw_payload   JSONB
);

-- backfill reads ranges of event_ts.
CREATE INDEX IF NOT EXISTS engagement_events_event_ts_idx ON engagement_events (event_ts);

INSERT INTO content VALUES (1,'video',300),(2,'video',120),(3,'article',NULL)
ON CONFLICT (content_id) DO NOTHING;
