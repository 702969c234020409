//! `rateLimit`: deliveries started at an even pace.

use super::*;

/// Spaces starts evenly at `rate` per second (no burst): the limit is per worker, and an
/// even pace is what a rate-limited sink expects.
#[derive(Debug)]
pub struct Pacer {
    next: tokio::sync::Mutex<Instant>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }
}

impl Pacer {
    /// Waits for the next start slot; `None` (unlimited) returns at once.
    pub async fn wait(&self, rate: Option<u32>) {
        let Some(rate) = rate else { return };
        let mut next = self.next.lock().await;
        let now = Instant::now();
        if *next < now {
            *next = now;
        }
        let at = *next;
        *next += Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        drop(next);
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_starts_and_can_change_rate() {
        let p = Pacer::default();
        let start = Instant::now();
        for _ in 0..5 {
            p.wait(Some(10)).await;
        }
        // Starts at 0, 100, 200, 300 and 400 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(400));
        let t = Instant::now();
        p.wait(Some(2)).await; // the slot booked at 10/s
        p.wait(Some(2)).await;
        assert_eq!(t.elapsed(), Duration::from_millis(600));
        let t = Instant::now();
        for _ in 0..100 {
            p.wait(None).await;
        }
        assert!(t.elapsed() < Duration::from_millis(1));
    }
}
