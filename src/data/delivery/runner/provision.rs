//! The subscription's queues: declaring them and their bindings, the delay queues of retries,
//! and finding the queues of an earlier shape that must be drained.

use super::*;

impl Inner {
    /// Declares the queues and bindings; true if the subscription's queue did not exist.
    pub(super) async fn provision(&self) -> Result<bool, DeliveryError> {
        let broker = &self.stream.broker;
        let first = self.names.consumed()[0].clone();
        let fresh = broker.queue_counts(&first).await?.is_none();
        self.declare_or_keep(&self.names.dead_letter_queue, FieldTable::default())
            .await?;
        match &self.names.intake {
            None => {
                self.declare_or_keep(&self.names.queue, FieldTable::default())
                    .await?;
            }
            Some(_) => self.declare_lanes().await?,
        }
        for exchange in self.exchanges() {
            self.bind_exchange(&exchange).await?;
        }
        if self.names.intake.is_some() {
            // The consistent-hash exchange of earlier versions: deleting it removes its
            // bindings both ways, so the streams reach the lanes through the intake only.
            // Events it already routed stay in their lanes and are delivered from there.
            broker
                .delete_exchange(&Names::legacy_hash_exchange(&self.plan))
                .await?;
        }
        self.state.provisioned.store(true, Ordering::Release);
        Ok(fresh)
    }

    /// perKey: the intake, the lanes and their hold queues. Single active consumer on the
    /// intake: one worker at a time moves it to the lanes, so the events of a key reach its
    /// lane in the order they were published; on each lane: one worker delivers its events.
    pub(super) async fn declare_lanes(&self) -> Result<(), DeliveryError> {
        let single_active = || {
            let mut a = FieldTable::default();
            a.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            a
        };
        if let Some(intake) = &self.names.intake {
            self.declare_or_keep(intake, single_active()).await?;
        }
        for q in &self.names.partitions {
            self.declare_or_keep(q, single_active()).await?;
        }
        for h in &self.names.holds {
            self.declare_or_keep(h, FieldTable::default()).await?;
        }
        Ok(())
    }

    /// Binds the subscription's queue (its intake under perKey) to a stream's exchange, with
    /// the topic patterns its filters allow.
    pub(super) async fn bind_exchange(&self, exchange: &str) -> Result<(), DeliveryError> {
        let broker = &self.stream.broker;
        broker.declare_exchange(exchange).await?;
        for k in &binding_keys(&self.plan) {
            broker.bind_queue(self.names.bound(), exchange, k).await?;
        }
        Ok(())
    }

    /// Undoes [`Inner::bind_exchange`].
    pub(super) async fn unbind_exchange(&self, exchange: &str) -> Result<(), DeliveryError> {
        let broker = &self.stream.broker;
        for k in &binding_keys(&self.plan) {
            broker.unbind_queue(self.names.bound(), exchange, k).await?;
        }
        Ok(())
    }

    pub(super) async fn declare_delay_queue(
        &self,
        queue: &str,
        delay: Duration,
    ) -> Result<(), DeliveryError> {
        let qt = self.stream.plan.broker.queue_type;
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        // Back to the subscription's queue (perKey retries wait in place, so this is only
        // used with ordering none).
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.names.queue.as_str().into()),
        );
        if qt == QueueType::Quorum {
            // Expired messages move at least once: the broker republishes with a confirm
            // before it drops the message here.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        self.declare_or_keep(queue, args).await
    }

    /// Declares a queue. One that exists with other immutable arguments (the stream's
    /// `queueType` changed, say) is kept as it is and reported, instead of failing for ever:
    /// its messages stay deliverable. Deleting the subscription with `--prune` recreates it.
    pub(super) async fn declare_or_keep(
        &self,
        name: &str,
        args: FieldTable,
    ) -> Result<(), DeliveryError> {
        let qt = self.stream.plan.broker.queue_type;
        match self.stream.broker.declare_queue(name, qt, args).await {
            Err(BrokerError::Protocol { code: 406, text }) => {
                if self.stream.broker.queue_counts(name).await?.is_none() {
                    return Err(BrokerError::Protocol { code: 406, text }.into());
                }
                let notice = format!(
                    "queue {name} exists with other arguments ({text}); it is kept as it is \
                     (delete the subscription with --prune to recreate it)"
                );
                tracing::warn!(subscription = %self.plan.key, "{notice}");
                *self.state.notice.locked() = Some(notice);
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// Queues of an earlier shape of this subscription (another `ordering`, fewer
    /// `partitions`) that still exist: unbound here so that nothing new reaches them, then
    /// drained by [`drain`].
    pub(super) async fn retire_stale(&self) -> Result<Vec<String>, DeliveryError> {
        let broker = &self.stream.broker;
        // The queue the streams published into under the other ordering.
        let other_bound = match &self.plan.ordering {
            OrderingPlan::None => format!("{}.intake", self.names.queue),
            OrderingPlan::PerKey { .. } => self.names.queue.clone(),
        };
        let first_lane = match &self.plan.ordering {
            OrderingPlan::None => 0,
            OrderingPlan::PerKey { partitions, .. } => *partitions,
        };
        let mut stale = vec![];
        if broker.queue_counts(&other_bound).await?.is_some() {
            stale.push(other_bound.clone());
        }
        // Lanes are always declared p0, p1, … in order, so the first one missing ends the
        // stale ones: looking further would only log the broker's NOT_FOUND for each. Only
        // the intake's mover feeds a lane, and it moves to the current lanes only.
        for i in first_lane..MAX_PARTITIONS_SCAN {
            let q = format!("{}.p{i}", self.names.queue);
            if broker.queue_counts(&q).await?.is_none() {
                break;
            }
            stale.push(q);
        }
        if stale.is_empty() {
            return Ok(stale);
        }
        // Lanes of earlier versions were fed by a consistent-hash exchange; deleting it
        // removes its bindings, both ways.
        broker
            .delete_exchange(&Names::legacy_hash_exchange(&self.plan))
            .await?;
        if stale.contains(&other_bound) {
            let mut keys = binding_keys(&self.plan);
            keys.push("#".into());
            keys.dedup();
            for exchange in self.exchanges() {
                for k in &keys {
                    broker.unbind_queue(&other_bound, &exchange, k).await?;
                }
            }
        }
        tracing::info!(subscription = %self.plan.key, queues = ?stale, "draining queues of an earlier shape");
        Ok(stale)
    }
}
