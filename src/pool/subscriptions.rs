//! The desired subscriptions, kept in the order the user made them.
//!
//! Owned by the pool thread alone. Whatever walks the channels (placement on a new
//! connection, the restore after a reconnect, the hand-over to a replacement) walks
//! them in subscription order, so each connection is sent its subscribes in that
//! order: a venue that needs a snapshot channel before its deltas, or a trader who
//! subscribed the book before the trades, gets them back in the order asked for. A
//! channel subscribed again after an unsubscribe goes last; subscribing one already
//! desired keeps its place.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Where one desired channel lives.
#[derive(Debug, Default, Clone)]
pub(super) struct Placement {
    pub owner: Option<u64>,
    pub confirmed: bool,
    /// Connections whose codec failed encoding this channel's subscription.
    pub codec_failures: u32,
}

impl Placement {
    /// On no connection (its own is gone or going); what the codec did with it stays.
    pub fn unplace(&mut self) {
        self.owner = None;
        self.confirmed = false;
    }
}

/// The desired channels in subscription order, each with its placement. Adding,
/// removing and finding a channel cost O(log n); walking them all costs O(n).
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    /// Subscription number -> channel and placement: iterated in subscription order.
    by_order: BTreeMap<u64, (Arc<str>, Placement)>,
    /// Channel -> its subscription number.
    order_of: HashMap<Arc<str>, u64>,
    /// The number the next new subscription takes.
    next_order: u64,
}

impl Subscriptions {
    pub fn new() -> Subscriptions {
        Subscriptions::default()
    }

    pub fn len(&self) -> usize {
        self.order_of.len()
    }

    /// Adds `channel` last, unplaced. False (and nothing changes, its place included)
    /// when it is already desired.
    pub fn insert(&mut self, channel: Arc<str>) -> bool {
        if self.order_of.contains_key(&channel) {
            return false;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.order_of.insert(Arc::clone(&channel), order);
        self.by_order.insert(order, (channel, Placement::default()));
        true
    }

    pub fn remove(&mut self, channel: &str) -> Option<Placement> {
        let order = self.order_of.remove(channel)?;
        self.by_order.remove(&order).map(|(_, placement)| placement)
    }

    pub fn get_mut(&mut self, channel: &str) -> Option<&mut Placement> {
        let order = self.order_of.get(channel)?;
        self.by_order.get_mut(order).map(|(_, placement)| placement)
    }

    /// Every channel with its placement, in subscription order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Placement)> {
        self.by_order
            .values()
            .map(|(channel, placement)| (channel, placement))
    }

    pub fn values(&self) -> impl Iterator<Item = &Placement> {
        self.by_order.values().map(|(_, placement)| placement)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Placement> {
        self.by_order.values_mut().map(|(_, placement)| placement)
    }

    /// The channels placed on `connection_id`, in subscription order.
    pub fn owned_by(&self, connection_id: u64) -> Vec<Arc<str>> {
        self.iter()
            .filter(|(_, placement)| placement.owner == Some(connection_id))
            .map(|(channel, _)| Arc::clone(channel))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(subscriptions: &Subscriptions) -> Vec<&str> {
        subscriptions
            .iter()
            .map(|(channel, _)| channel.as_ref())
            .collect()
    }

    #[test]
    fn walks_channels_in_subscription_order_not_by_name() {
        let mut subscriptions = Subscriptions::new();
        for channel in ["trades.X", "book.X", "c", "a"] {
            assert!(subscriptions.insert(Arc::from(channel)));
        }
        assert_eq!(channels(&subscriptions), ["trades.X", "book.X", "c", "a"]);
    }

    #[test]
    fn a_repeated_subscribe_keeps_its_place_and_a_re_subscribe_goes_last() {
        let mut subscriptions = Subscriptions::new();
        for channel in ["b", "a", "c"] {
            subscriptions.insert(Arc::from(channel));
        }
        subscriptions.get_mut("b").expect("b").owner = Some(7);
        assert!(!subscriptions.insert(Arc::from("b")), "already desired");
        assert_eq!(channels(&subscriptions), ["b", "a", "c"]);
        assert_eq!(
            subscriptions
                .get_mut("b")
                .and_then(|placement| placement.owner),
            Some(7),
            "a repeated subscribe leaves the placement alone"
        );
        assert!(subscriptions.remove("a").is_some());
        assert!(subscriptions.remove("a").is_none());
        assert!(subscriptions.get_mut("a").is_none());
        subscriptions.insert(Arc::from("a"));
        assert_eq!(channels(&subscriptions), ["b", "c", "a"]);
        assert_eq!(subscriptions.len(), 3);
        assert_eq!(subscriptions.owned_by(7), [Arc::<str>::from("b")]);
    }
}
